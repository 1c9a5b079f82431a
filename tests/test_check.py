"""blockpull.check against qemu-img check: clean, leaky and corrupted qcow2 images."""
import json
import shutil

import pytest

import blockpull
import qcow2_edit as q

MASK = 0x00FFFFFFFFFFFE00


def qemu_check(qemu, path):
    """(exit code, json dict) of qemu-img check."""
    r = qemu.img("check", "--output=json", str(path), check=False)
    return r.returncode, json.loads(r.stdout)


def assert_agrees(qemu, path):
    rc, d = qemu_check(qemu, path)
    if d["format"] == "qed":   # qemu-img reports no image end offset for QED
        d.setdefault("image-end-offset", blockpull.check(path).image_end_offset)
    r = blockpull.check(path)
    assert (r.exit_code, r.corruptions, r.leaks, r.check_errors) == \
        (rc, d.get("corruptions", 0), d.get("leaks", 0), d["check-errors"]), (d, r.messages)
    assert r.image_end_offset == d["image-end-offset"]
    assert r.total_clusters == d["total-clusters"]
    assert r.allocated_clusters == d.get("allocated-clusters", 0)
    assert r.compressed_clusters == d.get("compressed-clusters", 0)
    assert r.fragmented_clusters == d.get("fragmented-clusters", 0)
    return r


@pytest.fixture
def filled(tmp_path, qemu):
    """A v3 image with data, a zero cluster and a compressed cluster."""
    p = qemu.create(tmp_path / "a.qcow2", 8 << 20)
    qemu.io(p, "write -P 1 0 1M", "write -c -P 2 2M 64k", "write -z 4M 64k",
            "write -P 3 6M 64k")
    return p


@pytest.mark.parametrize("opts", [
    "compat=1.1", "compat=0.10", "cluster_size=512", "cluster_size=2M",
    "refcount_bits=1", "refcount_bits=2", "refcount_bits=8", "refcount_bits=64",
    "compression_type=zstd", "extended_l2=on",
])
def test_clean_images_agree(tmp_path, qemu, opts):
    p = qemu.create(tmp_path / "c.qcow2", 8 << 20, opts=[opts])
    qemu.io(p, "write -P 1 0 700k", "write -c -P 2 2M 2M", "write -P 3 5M 4k")
    r = assert_agrees(qemu, p)
    assert r.clean and r.exit_code == 0 and r.messages == ()


def test_snapshots_and_shared_tables_clean(tmp_path, qemu, filled):
    qemu.img("snapshot", "-c", "s1", filled)
    qemu.io(filled, "write -P 7 0 64k", "write -P 8 2M 64k")
    qemu.img("snapshot", "-c", "s2", filled)
    qemu.io(filled, "write -P 9 64k 64k")
    r = assert_agrees(qemu, filled)
    assert r.clean


def test_blockpull_written_image_clean(tmp_path, qemu):
    p = str(tmp_path / "b.qcow2")
    blockpull.create(p, 4 << 20, cluster_size=4096)
    with blockpull.open(p) as img:
        img.write(1000, b"x" * 300_000)
        img.write_zeroes(2 << 20, 8192)
    assert assert_agrees(qemu, p).clean


def test_empty_image(tmp_path, qemu):
    p = qemu.create(tmp_path / "e.qcow2", 1 << 30)
    assert assert_agrees(qemu, p).clean


def test_leak_by_bumped_refcount(tmp_path, qemu, filled):
    q.set_refcount(filled, 0, 2)            # the header cluster: counted twice, used once
    r = assert_agrees(qemu, filled)
    assert (r.exit_code, r.leaks, r.corruptions) == (3, 1, 0)
    assert any("Leaked cluster 0" in m for m in r.messages)


def test_leak_by_unlinked_allocation_and_repair(tmp_path, qemu, filled):
    want = qemu.to_raw(filled, tmp_path / "want.raw")
    from blockpull._fileio import File
    from blockpull._qcow2 import Qcow2
    drv = Qcow2(File(filled, True), True)
    host = drv.alloc_clusters(5)             # counted, written, never linked: a crash's leak
    drv.file.pwrite(b"\xee" * (5 << 16), host)
    drv.flush()
    drv.close()
    r = assert_agrees(qemu, filled)
    assert (r.exit_code, r.leaks) == (3, 5)
    fixed = blockpull.check(filled, repair=True)
    assert fixed.leaks_fixed == 5 and fixed.leaks == 0 and fixed.exit_code == 0
    qemu.assert_clean(filled)
    assert blockpull.check(filled).clean
    assert qemu.to_raw(filled, tmp_path / "got.raw") == want


def test_zeroed_refcount_is_corruption(tmp_path, qemu, filled):
    data = q.l2_entry(filled, 0) & MASK
    q.set_refcount(filled, data >> 16, 0)
    r = assert_agrees(qemu, filled)
    assert r.exit_code == 2 and r.corruptions == 2   # the count, and COPIED without refcount 1
    assert any("OFLAG_COPIED" in m for m in r.messages)


def test_two_entries_one_cluster(tmp_path, qemu, filled):
    q.poke(filled, q.l2_entry_pos(filled, 65536), ">Q", q.l2_entry(filled, 0))
    r = assert_agrees(qemu, filled)
    assert (r.exit_code, r.corruptions, r.leaks) == (2, 1, 1)


def test_repair_leaves_corruptions(tmp_path, qemu, filled):
    q.poke(filled, q.l2_entry_pos(filled, 65536), ">Q", q.l2_entry(filled, 0))
    r = blockpull.check(filled, repair=True)
    assert (r.leaks_fixed, r.leaks, r.corruptions, r.exit_code) == (1, 0, 1, 2)
    rc, d = qemu_check(qemu, filled)
    assert (rc, d.get("corruptions", 0), d.get("leaks", 0)) == (2, 1, 0)


def test_metadata_overlap_reported(tmp_path, qemu, filled):
    l1 = q.header(filled)["l1_table_offset"]
    q.poke(filled, q.l2_entry_pos(filled, 65536), ">Q", l1 | 1 << 63)
    r = assert_agrees(qemu, filled)
    assert r.exit_code == 2
    assert any("overlap" in m and "L1 table" in m for m in r.messages)


def test_unaligned_and_past_eof_entries(tmp_path, qemu, filled):
    a = tmp_path / "u.qcow2"
    shutil.copy(filled, a)
    e = q.l2_entry(a, 0)
    q.poke(a, q.l2_entry_pos(a, 65536), ">Q", ((e & MASK) + 512) | 1 << 63)
    assert assert_agrees(qemu, a).exit_code == 2
    b = tmp_path / "e.qcow2"
    shutil.copy(filled, b)
    q.poke(b, q.l2_entry_pos(b, 65536), ">Q", (1 << 40) | 1 << 63)
    r = assert_agrees(qemu, b)
    assert any("past the end of the file" in m for m in r.messages)


def test_copied_flag_mismatch(tmp_path, qemu, filled):
    pos = q.l2_entry_pos(filled, 0)
    q.poke(filled, pos, ">Q", q.l2_entry(filled, 0) & ~(1 << 63))
    r = assert_agrees(qemu, filled)
    assert (r.exit_code, r.corruptions) == (2, 1)


def test_compressed_with_copied_flag(tmp_path, qemu, filled):
    pos = q.l2_entry_pos(filled, 2 << 20)
    e = q.l2_entry(filled, 2 << 20)
    assert e & (1 << 62)
    q.poke(filled, pos, ">Q", e | 1 << 63)
    r = assert_agrees(qemu, filled)
    assert r.exit_code == 2


def test_repair_sets_copied_where_count_drops_to_one(tmp_path, qemu, filled):
    # a cluster counted twice, referenced once, COPIED clear: a leak and nothing else
    pos = q.l2_entry_pos(filled, 0)
    e = q.l2_entry(filled, 0)
    q.poke(filled, pos, ">Q", e & ~(1 << 63))
    q.set_refcount(filled, (e & MASK) >> 16, 2)
    assert assert_agrees(qemu, filled).exit_code == 3
    r = blockpull.check(filled, repair=True)
    assert r.exit_code == 0 and r.leaks_fixed == 1
    qemu.assert_clean(filled)
    assert q.l2_entry(filled, 0) & (1 << 63)


def test_leak_in_snapshot_shared_cluster_repair(tmp_path, qemu, filled):
    qemu.img("snapshot", "-c", "s1", filled)
    c = (q.l2_entry(filled, 0) & MASK) >> 16
    assert q.get_refcount(filled, c) == 2
    q.set_refcount(filled, c, 3)
    assert assert_agrees(qemu, filled).leaks == 1
    assert blockpull.check(filled, repair=True).exit_code == 0
    qemu.assert_clean(filled)
    assert q.get_refcount(filled, c) == 2


@pytest.mark.parametrize("bits", [1, 4, 64])
def test_repair_narrow_and_wide_refcounts(tmp_path, qemu, bits):
    p = qemu.create(tmp_path / "r.qcow2", 4 << 20, opts=[f"refcount_bits={bits}"])
    qemu.io(p, "write -P 1 0 256k")
    from blockpull._fileio import File
    from blockpull._qcow2 import Qcow2
    drv = Qcow2(File(p, True), True)
    host = drv.alloc_clusters(3)
    drv.file.pwrite(b"\xee" * (3 << 16), host)
    drv.flush()
    drv.close()
    assert assert_agrees(qemu, p).leaks == 3
    r = blockpull.check(p, repair=True)
    assert r.leaks_fixed == 3 and r.exit_code == 0
    qemu.assert_clean(p)


def test_check_result_json_and_errors(tmp_path, qemu, filled):
    r = blockpull.check(filled)
    d = r.to_json()
    assert d["format"] == "qcow2" and "corruptions" not in d
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(blockpull.ImageFormatError):
        blockpull.check(raw)
    with pytest.raises(blockpull.ImageFormatError):
        blockpull.check(raw, format="raw")


def test_check_refuses_image_open_for_writing(tmp_path, qemu, filled):
    with blockpull.open(filled):
        with pytest.raises(blockpull.ImageLockedError):
            blockpull.check(filled, repair=True)


def test_qed_agrees_with_qemu(tmp_path, qemu):
    p = qemu.create(tmp_path / "q.qed", 8 << 20, fmt="qed")
    qemu.io(p, "write -P 1 0 1M", "write -z 3M 64k", "write -P 2 5M 4k", fmt="qed")
    r = assert_agrees(qemu, p)
    assert r.clean and r.format == "qed"
    with open(p, "ab") as f:                     # appended, never referenced: leaks
        f.write(b"x" * (2 << 16))
    r = assert_agrees(qemu, p)
    assert (r.exit_code, r.leaks) == (3, 2)
    assert blockpull.check(p, repair=True).leaks == 2   # QED leaks cannot be given back
    # an L2 entry pointing at another entry's cluster: referenced twice
    import struct
    with open(p, "r+b") as f:
        hdr = f.read(64)
        l1 = struct.unpack_from("<Q", hdr, 40)[0]
        f.seek(l1)
        l2 = struct.unpack("<Q", f.read(8))[0]
        f.seek(l2)
        e0 = f.read(8)
        f.seek(l2 + 8)
        f.write(e0)
    r = assert_agrees(qemu, p)
    assert r.exit_code == 2
