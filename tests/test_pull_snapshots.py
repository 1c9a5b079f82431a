"""A pull keeps every internal snapshot of the top reading exactly what it read before.

A snapshot's unallocated clusters read the backing chain, like the active image's. When
the pull drops (or changes) the backing link they would silently change, so the pull
fills them too (QEMU's own block-stream leaves them empty).
"""
import shutil

import pytest

import blockpull


def snapshot_raw(qemu, path, name, out):
    qemu.img("convert", "-l", f"snapshot.name={name}", "-O", "raw", str(path), str(out))
    return out.read_bytes()


@pytest.mark.parametrize("base", [None, "b.qcow2"])
def test_snapshots_survive_pull(tmp_path, qemu, base):
    b = qemu.create(tmp_path / "b.qcow2", 8 << 20)
    qemu.io(b, "write -P 1 0 8M")
    m = qemu.create(tmp_path / "m.qcow2", 8 << 20, backing="b.qcow2")
    qemu.io(m, "write -P 2 1M 2M", "write -z 6M 64k")
    t = qemu.create(tmp_path / "t.qcow2", 8 << 20, backing="m.qcow2")
    qemu.io(t, "write -P 3 0 64k")
    qemu.img("snapshot", "-c", "s1", t)
    qemu.io(t, "write -P 4 1M 128k", "write -P 5 5M 1M")   # active diverges from s1
    qemu.img("snapshot", "-c", "s2", t)
    qemu.io(t, "write -P 6 7M 64k")
    before = {s: snapshot_raw(qemu, t, s, tmp_path / f"{s}.raw") for s in ("s1", "s2")}
    want = tmp_path / "want.raw"
    qemu.to_raw(t, want)

    info = blockpull.pull(t, base=base)
    assert info.status == "completed"
    qemu.assert_clean(t)
    assert qemu.compare(t, want, None, "raw")
    assert qemu.info(t).get("backing-filename") == base
    for s, data in before.items():
        assert snapshot_raw(qemu, t, s, tmp_path / f"{s}.after.raw") == data, f"snapshot {s} changed"
        # and applying it gives the same bytes, with a clean image
        c = tmp_path / f"apply-{s}.qcow2"
        shutil.copy(t, c)
        qemu.img("snapshot", "-a", s, str(c))
        qemu.assert_clean(c)
        assert qemu.compare(c, tmp_path / f"{s}.raw", None, "raw")


def test_snapshot_then_writes_then_pull_then_writes(tmp_path, qemu):
    b = qemu.create(tmp_path / "b.qcow2", 4 << 20)
    qemu.io(b, "write -P 1 0 4M")
    t = qemu.create(tmp_path / "t.qcow2", 4 << 20, backing="b.qcow2")
    qemu.img("snapshot", "-c", "empty", t)
    before = snapshot_raw(qemu, t, "empty", tmp_path / "e.raw")
    with blockpull.open(t) as img:
        img.write(100, b"x" * 70000)
        img.pull().result(timeout=60)
        img.write(3 << 20, b"y" * 5000)
    qemu.assert_clean(t)
    assert snapshot_raw(qemu, t, "empty", tmp_path / "e2.raw") == before
