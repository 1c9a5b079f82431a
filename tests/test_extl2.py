"""Writable qcow2 images with extended L2 entries (subclusters): guest writes, pulls,
copy-on-read and check, judged by qemu-img compare / check / map against what the chain
read before or against a reference image qemu-io wrote the same way."""
import errno
import shutil
import struct

import pytest

import blockpull

SIZES = [32768, 65536, 2 << 20]
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def ext_chain(qemu, d, cs, mid_ext=True):
    """base (plain) <- mid <- top (extended L2), ``cs``-byte clusters in all three.
    The top holds a whole cluster (0), one subcluster (cluster 1), zero subclusters
    (cluster 2), a half-allocated cluster (4) and a compressed one (6); returns
    (top, size)."""
    sc = cs // 32
    size = max(8 * cs, 1 << 20)
    base = qemu.create(d / "base.qcow2", size, opts=[f"cluster_size={cs}"])
    qemu.io(base, f"write -P 1 0 {size}")
    mid = qemu.create(d / "mid.qcow2", size, backing="base.qcow2",
                      opts=[f"cluster_size={cs}" + (",extended_l2=on" if mid_ext else "")])
    qemu.io(mid, f"write -P 2 {cs} {2 * cs}", f"write -z {3 * cs} {4 * sc}",
            f"write -P 3 {5 * cs + sc} {3 * sc}")
    top = qemu.create(d / "top.qcow2", size, backing="mid.qcow2",
                      opts=[f"cluster_size={cs},extended_l2=on"])
    qemu.io(top, f"write -P 4 0 {cs}", f"write -P 5 {cs + 2 * sc} {sc}",
            f"write -z {2 * cs + 4 * sc} {2 * sc}", f"write -P 6 {4 * cs} {16 * sc}",
            f"write -c -P 7 {6 * cs} {cs}")
    return top, size


def ops_for(cs):
    """Guest writes (offset, length, pattern; pattern None: write zeros): unaligned,
    across subclusters and clusters, into zero, half-allocated and compressed
    clusters, and zero writes of part of a subcluster, of whole subclusters and of a
    whole cluster."""
    sc = cs // 32
    return [
        (7 * cs + 100, 700, 8),                    # inside one subcluster of an empty cluster
        (7 * cs + sc - 100, 300, 9),               # across two subclusters
        (cs - 1000, 3000, 10),                     # across clusters (full -> one subcluster)
        (2 * cs + 4 * sc + 10, 20, 11),            # into a zero subcluster
        (4 * cs + 15 * sc + 7, sc + 100, 12),      # allocated -> unallocated subclusters
        (6 * cs + 3 * sc + 1, 50, 13),             # into the compressed cluster
        (2 * cs + 30 * sc, cs + 4 * sc + 3, 14),   # across clusters, unaligned end
        (3 * cs + 100, 2 * sc, None),              # zeros: part, whole, part subclusters
        (5 * cs, cs, None),                        # zeros: a whole cluster
        (4 * cs + 3 * sc, 2 * sc, None),           # zeros: whole allocated subclusters
        (4 * cs + 3 * sc + 5, 10, 15),             # data into a zero subcluster again
    ] + ([(8 * cs, 3 * cs + 5, 16)]                # whole new clusters in one run
         if 12 * cs <= max(8 * cs, 1 << 20) else [])


def depth0_data(qemu, path):
    """(start, length) of the ranges the top itself maps to data, per qemu-img map."""
    return [(e["start"], e["length"]) for e in qemu.map(path)
            if e["depth"] == 0 and e["data"]]


@pytest.mark.parametrize("cs", SIZES)
def test_writes_match_qemu(tmp_path, qemu, cs):
    top, size = ext_chain(qemu, tmp_path, cs)
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    cmds = []
    with blockpull.open(top) as img:
        for off, n, pat in ops_for(cs):
            if pat is None:
                img.write_zeroes(off, n)
                cmds.append(f"write -z {off} {n}")
            else:
                img.write(off, bytes([pat]) * n)
                cmds.append(f"write -P {pat} {off} {n}")
        img.flush()
        mine = img.read(0, size)
    qemu.io(ref, *cmds)
    qemu.assert_clean(top)
    assert qemu.compare(top, ref), "written image differs from qemu-io's"
    assert mine == qemu.to_raw(ref, tmp_path / "ref.raw")
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)


@pytest.mark.parametrize("cs", SIZES)
def test_write_allocates_only_its_subclusters(tmp_path, qemu, cs):
    sc = cs // 32
    top, size = ext_chain(qemu, tmp_path, cs)
    before = depth0_data(qemu, top)
    with blockpull.open(top) as img:
        img.write(7 * cs + 3 * sc + 100, b"\x21" * 512)
    got = depth0_data(qemu, top)
    assert sorted(set(got) - set(before)) == [(7 * cs + 3 * sc, sc)]
    qemu.assert_clean(top)
    with blockpull.open(top, readonly=True) as img:
        want = bytearray(b"\1" * sc)
        want[100:612] = b"\x21" * 512
        assert img.read(7 * cs + 3 * sc, sc) == bytes(want)


@pytest.mark.parametrize("cs", SIZES)
@pytest.mark.parametrize("base", [None, "base.qcow2"])
def test_pull(tmp_path, qemu, cs, base):
    top, size = ext_chain(qemu, tmp_path, cs, mid_ext=(cs != 65536))
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        info = img.pull(base=base).result(timeout=120)
        assert info.status == "completed" and info.cur == info.end
        assert img.read(0, size) == want.read_bytes()
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw"), "pulled image differs from its chain"
    qinfo = qemu.info(top)
    assert qinfo.get("backing-filename") == base
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    assert qinfo["format-specific"]["data"]["extended-l2"] is True
    if base is None:
        # every subcluster the chain held data in is the top's own now
        assert all(e["depth"] == 0 for e in qemu.map(top) if e["data"])
    else:
        # what mid held (data and zeros) is the top's own now; only base shows through
        sc = cs // 32
        mid_ranges = [(cs, 3 * cs), (3 * cs, 3 * cs + 4 * sc), (5 * cs + sc, 5 * cs + 4 * sc)]
        for e in qemu.map(top):
            if e["depth"] > 0:
                assert not any(e["start"] < hi and lo < e["start"] + e["length"]
                               for lo, hi in mid_ranges), e


@pytest.mark.parametrize("cs", [32768, 65536])
def test_pull_keeps_the_tops_subclusters(tmp_path, qemu, cs):
    """The half-allocated cluster keeps its own data and zeros: the backing's data
    goes only where the top had nothing."""
    sc = cs // 32
    top, size = ext_chain(qemu, tmp_path, cs)
    blockpull.pull(top)
    qemu.assert_clean(top)
    with blockpull.open(top, readonly=True) as img:
        assert img.read(4 * cs, 16 * sc) == b"\6" * 16 * sc
        assert img.read(4 * cs + 16 * sc, 16 * sc) == b"\1" * 16 * sc
        assert img.read(cs, 2 * sc) == b"\2" * 2 * sc
        assert img.read(cs + 2 * sc, sc) == b"\5" * sc
        assert img.read(2 * cs + 4 * sc, 2 * sc) == bytes(2 * sc)
        assert img.read(6 * cs, cs) == b"\7" * cs


@pytest.mark.parametrize("cs", SIZES)
def test_copy_on_read(tmp_path, qemu, cs):
    top, size = ext_chain(qemu, tmp_path, cs)
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top, copy_on_read=True) as img:
        # an unaligned read first, then everything
        assert img.read(4 * cs + 100, cs) == want.read_bytes()[4 * cs + 100:5 * cs + 100]
        assert img.read(0, size) == want.read_bytes()
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")
    assert all(e["depth"] == 0 for e in qemu.map(top) if e["data"])
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    # nothing is left for a pull but to drop the backing link
    with blockpull.open(top) as img:
        info = img.pull().result(timeout=60)
        assert info.end == 0
    assert qemu.compare(top, want, None, "raw")


@pytest.mark.parametrize("cs", [32768, 2 << 20])
def test_writes_then_pull_keeping_base(tmp_path, qemu, cs):
    top, size = ext_chain(qemu, tmp_path, cs)
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    with blockpull.open(top) as img:
        for off, n, pat in ops_for(cs):
            if pat is None:
                img.write_zeroes(off, n)
                qemu.io(ref, f"write -z {off} {n}")
            else:
                img.write(off, bytes([pat]) * n)
                qemu.io(ref, f"write -P {pat} {off} {n}")
        assert img.pull(base="mid.qcow2").result(timeout=120).status == "completed"
    qemu.assert_clean(top)
    assert qemu.compare(top, ref)
    assert qemu.info(top).get("backing-filename") == "mid.qcow2"


@pytest.mark.parametrize("cs", [32768, 2 << 20])
def test_zero_writes_into_compressed_clusters(tmp_path, qemu, cs):
    """A compressed cluster zeroed whole becomes zero subclusters; zeroed in part it is
    rewritten whole, every subcluster allocated (a compressed entry's bitmap is 0)."""
    sc = cs // 32
    size = 4 * cs
    base = qemu.create(tmp_path / "base.qcow2", size, opts=[f"cluster_size={cs}"])
    qemu.io(base, f"write -P 1 0 {size}")
    top = qemu.create(tmp_path / "top.qcow2", size, backing="base.qcow2",
                      opts=[f"cluster_size={cs},extended_l2=on"])
    qemu.io(top, f"write -c -P 7 0 {cs}", f"write -c -P 8 {cs} {cs}",
            f"write -c -P 9 {2 * cs} {cs}")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    with blockpull.open(top) as img:
        img.write_zeroes(0, cs)
        img.write_zeroes(cs + 100, 2 * sc)
        img.write(2 * cs + sc + 3, b"\x44" * 10)
    qemu.io(ref, f"write -z 0 {cs}", f"write -z {cs + 100} {2 * sc}",
            f"write -P 0x44 {2 * cs + sc + 3} 10")
    qemu.assert_clean(top)
    assert qemu.compare(top, ref)
    assert blockpull.check(top).corruptions == 0
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    blockpull.pull(top)
    qemu.assert_clean(top)
    assert qemu.compare(top, ref)


@pytest.mark.parametrize("cs", [32768, 65536])
def test_guest_writes_during_pull(tmp_path, qemu, cs):
    """Guest writes (subclusters of half-allocated and lacking clusters) while a pull
    runs chunk by chunk: each write wins over the pull's copy, whenever it lands."""
    top, size = ext_chain(qemu, tmp_path, cs)
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    writes = [(off, n, pat) for off, n, pat in ops_for(cs) if pat is not None]
    with blockpull.open(top) as img:
        job = img.pull(bandwidth=size // 2, chunk=cs, batch=4 * cs)
        for off, n, pat in writes:
            img.write(off, bytes([pat]) * n)
            img.read(off + n, 1)
        info = job.result(timeout=120)
        assert info.status == "completed" and info.cur == info.end
    qemu.io(ref, *[f"write -P {pat} {off} {n}" for off, n, pat in writes])
    qemu.assert_clean(top)
    assert qemu.info(top).get("backing-filename") is None
    assert qemu.compare(top, ref)


def _l2_slot(path, cluster):
    with open(path, "rb") as f:
        h = f.read(72)
        cbits = struct.unpack(">I", h[20:24])[0]
        l1_off = struct.unpack(">Q", h[40:48])[0]
        l2_bits = cbits - 4
        f.seek(l1_off + 8 * (cluster >> l2_bits))
        l2 = struct.unpack(">Q", f.read(8))[0] & OFFSET_MASK
    return l2 + 16 * (cluster & ((1 << l2_bits) - 1))


@pytest.mark.parametrize("rule", ["alloc_and_zero", "compressed_bitmap", "unallocated_alloc"])
def test_check_subcluster_rules(tmp_path, qemu, rule):
    p = qemu.create(tmp_path / "e.qcow2", 1 << 20, opts=["extended_l2=on"])
    qemu.io(p, "write -P 1 0 4k", "write -c -P 2 64k 64k")
    assert blockpull.check(p).corruptions == 0
    cluster = {"alloc_and_zero": 0, "compressed_bitmap": 1, "unallocated_alloc": 2}[rule]
    slot = _l2_slot(p, cluster)
    with open(p, "r+b") as f:
        f.seek(slot)
        e, bm = struct.unpack(">QQ", f.read(16))
        if rule == "alloc_and_zero":
            bm |= 1 << 32
        elif rule == "compressed_bitmap":
            bm |= 1
        else:
            e, bm = 0, 1
        f.seek(slot)
        f.write(struct.pack(">QQ", e, bm))
    assert qemu.check(p) == 2          # qemu-img check: corruptions found
    r = blockpull.check(p)
    assert r.corruptions == 1, r.messages
    assert any("subcluster" in m for m in r.messages)


def test_writable_open_with_snapshots(tmp_path, qemu):
    """An image with extended L2 entries and internal snapshots opens writable, as QEMU
    opens it; a write changes the active view only (tests/test_extl2_snapshots.py has
    the rest)."""
    top, _ = ext_chain(qemu, tmp_path, 65536)
    qemu.img("snapshot", "-c", "s1", top)
    s1 = tmp_path / "s1.raw"
    qemu.img("convert", "-l", "snapshot.name=s1", "-O", "raw", top, str(s1))
    with blockpull.open(top) as img:
        assert img.read(0, 4096) == b"\4" * 4096
        img.write(100, b"\x22" * 5000)
        assert img.read(0, 4096) == b"\4" * 100 + b"\x22" * 3996
    qemu.assert_clean(top)
    s1_after = tmp_path / "s1.after.raw"
    qemu.img("convert", "-l", "snapshot.name=s1", "-O", "raw", top, str(s1_after))
    assert s1_after.read_bytes() == s1.read_bytes()


def test_failed_sync_unlinks_new_subclusters(tmp_path, qemu):
    """A failed fdatasync after subcluster writes: the subclusters they allocated (in
    place, and in a new host cluster) are unallocated again in memory, so no entry is
    ever written naming data that may be lost; flush then reports the loss, and the
    image on disk stays consistent and reads as before (or with the lost writes)."""
    from blockpull import faults
    cs = 65536
    sc = cs // 32
    top, size = ext_chain(qemu, tmp_path, cs)
    before = qemu.to_raw(top, tmp_path / "before.raw")
    img = blockpull.open(top)
    try:
        drv = img.layers[0]
        inj = faults.attach(img, faults.FaultInjector(record_writes=False))
        inj.fail(op="sync", role="top", errno=errno.EIO, nth=1)
        img.write(4 * cs + 20 * sc, b"\x31" * sc)       # in place: half-allocated cluster
        img.write(7 * cs + 5 * sc, b"\x32" * 100)       # a new host cluster
        assert drv.block_status(4 * cs + 20 * sc, sc)[0] == 1
        with pytest.raises(OSError):
            img.flush()
        assert drv.block_status(4 * cs + 20 * sc, sc)[0] == 0
        assert drv.block_status(7 * cs + 5 * sc, sc)[0] == 0
        assert drv.block_status(4 * cs, 16 * sc)[0:2] == (1, 16 * sc)
        with pytest.raises(OSError):
            img.flush()
        faults.detach(img)
    finally:
        try:
            img.close()
        except OSError:
            pass
    qemu.assert_clean(top)
    assert qemu.to_raw(top, tmp_path / "after.raw") == before
