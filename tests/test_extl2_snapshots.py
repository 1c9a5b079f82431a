"""Writable qcow2 images with extended L2 entries AND internal snapshots: guest writes,
zero writes, pulls (full and keeping a base), copy-on-read and check, judged by qemu-img
(compare against a reference qemu-io wrote the same way, check, map), with every
snapshot reading, and applying to, exactly what it held before."""
import errno
import shutil

import pytest

import blockpull
from test_extl2 import ops_for

SIZES = [32768, 65536, 2 << 20]


def snap_image(qemu, d, cs, backed):
    """An extended-L2 top (over base <- mid when ``backed``) with qemu-io writes (a whole
    cluster, single subclusters, zero subclusters, a half-allocated and a compressed
    cluster), snapshot ``s1``, then more qemu-io writes into clusters the snapshot
    shares (so the active view and the snapshot differ subcluster by subcluster);
    returns (top, size)."""
    sc = cs // 32
    size = max(8 * cs, 1 << 20)
    backing = None
    if backed:
        base = qemu.create(d / "base.qcow2", size, opts=[f"cluster_size={cs}"])
        qemu.io(base, f"write -P 1 0 {size}")
        mid = qemu.create(d / "mid.qcow2", size, backing="base.qcow2",
                          opts=[f"cluster_size={cs},extended_l2=on"])
        qemu.io(mid, f"write -P 2 {cs} {2 * cs}", f"write -z {3 * cs} {4 * sc}",
                f"write -P 3 {5 * cs + sc} {3 * sc}", f"write -z {7 * cs} {cs}")
        backing = "mid.qcow2"
    top = qemu.create(d / "top.qcow2", size, backing=backing,
                      opts=[f"cluster_size={cs},extended_l2=on"])
    qemu.io(top, f"write -P 4 0 {cs}", f"write -P 5 {cs + 2 * sc} {sc}",
            f"write -z {2 * cs + 4 * sc} {2 * sc}", f"write -P 6 {4 * cs} {16 * sc}",
            f"write -c -P 7 {6 * cs} {cs}")
    qemu.img("snapshot", "-c", "s1", top)
    qemu.io(top, f"write -P 8 {4 * cs + 20 * sc} {sc}", f"write -P 9 {cs + 2 * sc + 7} 100",
            f"write -z {3 * sc} {2 * sc}", f"write -P 10 {5 * cs + sc} {3 * sc}",
            f"write -P 11 {3 * cs + 5 * sc} {sc}")
    return top, size


def snapshot_raw(qemu, path, out, name="s1"):
    qemu.img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def assert_snapshot_kept(qemu, d, top, want, tag):
    """Snapshot s1 reads ``want`` (raw bytes), and applied to a copy it gives those bytes
    with a clean image."""
    assert snapshot_raw(qemu, top, d / f"s1.{tag}.raw") == want, "snapshot s1 changed"
    c = d / f"apply.{tag}.qcow2"
    shutil.copy(top, c)
    qemu.img("snapshot", "-a", "s1", str(c))
    qemu.assert_clean(c)
    assert qemu.compare(c, d / f"s1.{tag}.raw", None, "raw")


def assert_consistent(qemu, top):
    qemu.assert_clean(top)
    r = blockpull.check(top)
    assert (r.corruptions, r.leaks) == (0, 0), r.messages
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)


def apply_ops(qemu, img, ref, cs):
    """The guest writes of ``ops_for`` through blockpull on ``img`` and through qemu-io
    on the reference ``ref``."""
    cmds = []
    for off, n, pat in ops_for(cs):
        if pat is None:
            img.write_zeroes(off, n)
            cmds.append(f"write -z {off} {n}")
        else:
            img.write(off, bytes([pat]) * n)
            cmds.append(f"write -P {pat} {off} {n}")
    qemu.io(ref, *cmds)


@pytest.mark.parametrize("backed", [False, True])
@pytest.mark.parametrize("cs", SIZES)
def test_writes_keep_the_snapshot(tmp_path, qemu, cs, backed):
    top, size = snap_image(qemu, tmp_path, cs, backed)
    s1 = snapshot_raw(qemu, top, tmp_path / "s1.raw")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    with blockpull.open(top) as img:
        apply_ops(qemu, img, ref, cs)
        img.flush()
        mine = img.read(0, size)
    assert_consistent(qemu, top)
    assert qemu.compare(top, ref), "written image differs from qemu-io's"
    assert mine == qemu.to_raw(ref, tmp_path / "ref.raw")
    assert_snapshot_kept(qemu, tmp_path, top, s1, "after")


@pytest.mark.parametrize("base", [None, "base.qcow2"])
@pytest.mark.parametrize("cs", SIZES)
def test_pull_fills_the_snapshot_too(tmp_path, qemu, cs, base):
    top, size = snap_image(qemu, tmp_path, cs, True)
    s1 = snapshot_raw(qemu, top, tmp_path / "s1.raw")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        info = img.pull(base=base).result(timeout=120)
        assert info.status == "completed" and info.cur == info.end
        assert img.read(0, size) == want.read_bytes()
    assert_consistent(qemu, top)
    assert qemu.info(top).get("backing-filename") == base
    assert qemu.compare(top, want, None, "raw"), "pulled image differs from its chain"
    assert_snapshot_kept(qemu, tmp_path, top, s1, "pulled")
    if base is None:
        assert all(e["depth"] == 0 for e in qemu.map(top) if e["data"])


@pytest.mark.parametrize("cs", [32768, 2 << 20])
def test_writes_pull_writes(tmp_path, qemu, cs):
    """Guest writes, a pull keeping the base, then guest writes into clusters the pull
    made shared between the active view and the snapshot."""
    sc = cs // 32
    top, size = snap_image(qemu, tmp_path, cs, True)
    s1 = snapshot_raw(qemu, top, tmp_path / "s1.raw")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    late = [(7 * cs + 3, 2 * sc, 0x51), (5 * cs + 17 * sc + 9, sc + 1, 0x52),
            (2 * cs + 31 * sc, 2 * sc, 0x53)]
    with blockpull.open(top) as img:
        apply_ops(qemu, img, ref, cs)
        assert img.pull(base="base.qcow2").result(timeout=120).status == "completed"
        for off, n, pat in late:
            img.write(off, bytes([pat]) * n)
        img.write_zeroes(5 * cs + 20 * sc, 3 * sc)
    qemu.io(ref, *[f"write -P {pat} {off} {n}" for off, n, pat in late],
            f"write -z {5 * cs + 20 * sc} {3 * sc}")
    assert_consistent(qemu, top)
    assert qemu.info(top).get("backing-filename") == "base.qcow2"
    assert qemu.compare(top, ref)
    assert_snapshot_kept(qemu, tmp_path, top, s1, "late")
    blockpull.pull(top)
    assert_consistent(qemu, top)
    assert qemu.compare(top, ref)
    assert_snapshot_kept(qemu, tmp_path, top, s1, "full")


@pytest.mark.parametrize("cs", [32768, 65536])
def test_copy_on_read_then_pull(tmp_path, qemu, cs):
    top, size = snap_image(qemu, tmp_path, cs, True)
    s1 = snapshot_raw(qemu, top, tmp_path / "s1.raw")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top, copy_on_read=True) as img:
        assert img.read(4 * cs + 100, cs) == want.read_bytes()[4 * cs + 100:5 * cs + 100]
        assert img.read(0, size) == want.read_bytes()
    assert_consistent(qemu, top)
    assert qemu.compare(top, want, None, "raw")
    assert_snapshot_kept(qemu, tmp_path, top, s1, "cor")
    blockpull.pull(top)
    assert_consistent(qemu, top)
    assert qemu.compare(top, want, None, "raw")
    assert_snapshot_kept(qemu, tmp_path, top, s1, "cor-pulled")


def test_failed_sync_during_pull_unlinks_every_view(tmp_path, qemu):
    """The first fdatasync of a pull fails after it linked clusters into the active view
    and the snapshot: every link is undone in memory in every view (each cluster lacks
    again what it lacked before), the image on disk stays clean with its snapshot
    unchanged, and a second pull completes."""
    from blockpull import faults
    cs = 65536
    top, size = snap_image(qemu, tmp_path, cs, True)
    s1 = snapshot_raw(qemu, top, tmp_path / "s1.raw")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    img = blockpull.open(top)
    try:
        drv = img.layers[0]
        lacking = [drv.pull_status(v, cs)[0] for v in range(0, size, cs)]
        assert 0 in lacking and 1 in lacking
        inj = faults.attach(img, faults.FaultInjector(record_writes=False))
        inj.fail(op="sync", role="top", errno=errno.EIO, nth=1)
        with pytest.raises(blockpull.PullError, match="sync: Input/output error"):
            img.pull(chunk=cs, batch=2 * cs).result(timeout=120)
        faults.detach(img)
        assert [drv.pull_status(v, cs)[0] for v in range(0, size, cs)] == lacking
        assert img.read(0, size) == want.read_bytes()
    finally:
        img.close()
    assert_consistent(qemu, top)
    assert qemu.info(top).get("backing-filename") == "mid.qcow2"
    assert_snapshot_kept(qemu, tmp_path, top, s1, "failed")
    assert blockpull.pull(top).status == "completed"
    assert_consistent(qemu, top)
    assert qemu.compare(top, want, None, "raw")
    assert_snapshot_kept(qemu, tmp_path, top, s1, "resync")


@pytest.mark.parametrize("cs", [32768, 65536])
def test_pull_moves_the_active_view_off_a_cluster_the_snapshot_leaves(tmp_path, qemu, cs):
    """The active view zeroed what the snapshot lacks in a cluster they share (QEMU keeps
    the host offset): the pull gives the snapshot a new cluster, and the active view,
    complete, moves to one of its own too (or to none when it holds only zeros), so that
    it never names a cluster whose count is 1 without the COPIED bit."""
    sc = cs // 32
    size = 8 * cs
    base = qemu.create(tmp_path / "base.qcow2", size, opts=[f"cluster_size={cs}"])
    qemu.io(base, f"write -P 1 0 {size}")
    top = qemu.create(tmp_path / "top.qcow2", size, backing="base.qcow2",
                      opts=[f"cluster_size={cs},extended_l2=on"])
    qemu.io(top, f"write -P 6 {4 * cs} {16 * sc}", f"write -P 7 {5 * cs} {8 * sc}")
    qemu.img("snapshot", "-c", "s1", top)
    qemu.io(top, f"write -z {4 * cs + 16 * sc} {16 * sc}", f"write -z {5 * cs} {cs}")
    s1 = snapshot_raw(qemu, top, tmp_path / "s1.raw")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        assert img.pull().result(timeout=60).status == "completed"
    assert_consistent(qemu, top)
    assert qemu.info(top).get("backing-filename") is None
    assert qemu.compare(top, want, None, "raw")
    assert_snapshot_kept(qemu, tmp_path, top, s1, "moved")
    with blockpull.open(top) as img:
        img.write(4 * cs + 3, b"\x61" * 100)
        img.write(5 * cs + 9 * sc, b"\x62" * sc)
    qemu.io(str(want), f"write -P 0x61 {4 * cs + 3} 100", f"write -P 0x62 {5 * cs + 9 * sc} {sc}",
            fmt="raw")
    assert_consistent(qemu, top)
    assert qemu.compare(top, want, None, "raw")
    assert_snapshot_kept(qemu, tmp_path, top, s1, "moved-written")
