"""Guest writes and zero writes allocate what QEMU allocates (extended L2 entries, and
the zero-write rule for standard ones too).

Each case builds one top, copies it, runs the same write sequence with qemu-io on the
copy and with blockpull on the original, and asserts: the two ``qemu-img map`` outputs
are equal subcluster by subcluster (data, zero, depth, and whether a host offset is
named; not the offsets themselves: blockpull frees a replaced cluster only after the
next sync, where QEMU may reuse it at once), the two images compare equal, and
``qemu-img check`` finds the written one clean.

QEMU's rules matched here (docs/formats.md, "Extended L2"): a write into a cluster
without a host cluster of its own (none, or one shared with a snapshot) copies on write
every subcluster from the first to the last of the written and the old allocated ones;
a write into a compressed cluster rewrites it whole; a zero write that covers a
subcluster in part makes it a zero subcluster when it is unallocated or zero and the
rest of it reads zeros already, else writes zero data; whole subclusters take zero bits,
except that a compressed cluster covered in part at either end of a zero write turns the
write (16 MiB at a time) into one of zero data."""
import shutil

import pytest

import blockpull

# the top's clusters: what each holds before the writes
OWN, ZEROS, COMPRESSED, MIXED, EMPTY, OVER_ZERO, OVER_HOLE = 1, 2, 3, 4, 5, 6, 7


def build(qemu, d, cs, snapshot):
    """base (plain, data everywhere but a zero cluster 6 and an unallocated cluster 7)
    <- top (extended L2): own data in one subcluster of cluster 1, zero subclusters
    (no host cluster) in cluster 2, a compressed cluster 3, cluster 4 with data and
    zero subclusters, the rest empty; with ``snapshot`` an internal snapshot then
    shares every host cluster. Returns (top, reference copy, size)."""
    sc = cs // 32
    size = 9 * cs
    base = qemu.create(d / "base.qcow2", size, opts=[f"cluster_size={cs}"])
    qemu.io(base, f"write -P 1 0 {OVER_ZERO * cs}", f"write -z {OVER_ZERO * cs} {cs}",
            f"write -P 1 {8 * cs} {cs}")
    top = qemu.create(d / "top.qcow2", size, backing="base.qcow2",
                      opts=[f"cluster_size={cs},extended_l2=on"])
    qemu.io(top, f"write -P 2 {OWN * cs + 10 * sc} {sc}",
            f"write -z {ZEROS * cs + 2 * sc} {4 * sc}",
            f"write -c -P 3 {COMPRESSED * cs} {cs}",
            f"write -P 4 {MIXED * cs + 2 * sc} {sc}", f"write -z {MIXED * cs + 5 * sc} {2 * sc}",
            f"write -P 4 {MIXED * cs + 20 * sc} {sc}")
    if snapshot:
        qemu.img("snapshot", "-c", "s1", top)
    ref = str(d / "ref.qcow2")
    shutil.copy(top, ref)
    return top, ref, size


def shape(name, cs, c):
    """(offset, length) pieces of write shape ``name`` aimed at cluster ``c``."""
    sc = cs // 32
    t = c * cs
    return {
        "one_sub": [(t + 3 * sc + 10, 100)],
        "two_apart": [(t + 3 * sc, sc), (t + 13 * sc + 5, 10)],
        "head_tail": [(t + 3 * sc + 5, 3 * sc)],
        "whole": [(t, cs)],
        "across": [(t + 30 * sc + 5, 4 * sc)],
        "into_zero_sub": [(t + 3 * sc + 5, 10)],
        "sub_aligned": [(t + 2 * sc, 2 * sc)],
    }[name]


def run_both(qemu, top, ref, pieces, zero):
    cmds = []
    with blockpull.open(top) as img:
        for i, (off, n) in enumerate(pieces):
            if zero:
                img.write_zeroes(off, n)
                cmds.append(f"write -z {off} {n}")
            else:
                pat = 0x20 + i % 64
                img.write(off, bytes([pat]) * n)
                cmds.append(f"write -P {pat} {off} {n}")
        img.flush()
    qemu.io(ref, *cmds)


def allocation(qemu, path):
    """``qemu-img map`` with each host offset replaced by whether there is one, runs
    that then read alike merged."""
    out = []
    for e in qemu.map(path):
        key = (e["depth"], e["present"], e["zero"], e["data"], "offset" in e)
        if out and out[-1][0] == key and out[-1][1] + out[-1][2] == e["start"]:
            out[-1][2] += e["length"]
        else:
            out.append([key, e["start"], e["length"]])
    return out


def assert_same(qemu, top, ref):
    qemu.assert_clean(top)
    assert qemu.compare(top, ref), "written image reads differently from qemu-io's"
    assert allocation(qemu, top) == allocation(qemu, ref), "allocation differs from qemu-io's"


SHAPES = ["one_sub", "two_apart", "head_tail", "whole", "across", "into_zero_sub",
          "sub_aligned"]
TARGETS = [OWN, ZEROS, COMPRESSED, MIXED, EMPTY, OVER_ZERO, OVER_HOLE]


@pytest.mark.parametrize("cs", [32768, 65536])
@pytest.mark.parametrize("snapshot", [False, True], ids=["plain", "snapshot"])
@pytest.mark.parametrize("zero", [False, True], ids=["data", "zeros"])
@pytest.mark.parametrize("name", SHAPES)
def test_write_shape_allocates_as_qemu(tmp_path, qemu, cs, snapshot, zero, name):
    top, ref, _ = build(qemu, tmp_path, cs, snapshot)
    pieces = [p for c in TARGETS for p in shape(name, cs, c)]
    if name == "across":
        pieces = [p for p in pieces if p[0] + p[1] <= 9 * cs]
    run_both(qemu, top, ref, pieces, zero)
    assert_same(qemu, top, ref)


@pytest.mark.parametrize("zero", [False, True], ids=["data", "zeros"])
def test_2m_clusters(tmp_path, qemu, zero):
    cs = 2 << 20
    top, ref, _ = build(qemu, tmp_path, cs, True)
    pieces = [p for c in TARGETS for n in ("two_apart", "head_tail", "into_zero_sub")
              for p in shape(n, cs, c)]
    run_both(qemu, top, ref, pieces, zero)
    assert_same(qemu, top, ref)


@pytest.mark.parametrize("where", ["head", "tail", "both"])
def test_zero_write_over_compressed_in_part(tmp_path, qemu, where):
    """A zero write with a compressed cluster covered in part at its start, its end
    or both, longer than 16 MiB: QEMU writes zero data 16 MiB at a time while a part-
    covered compressed cluster is left, zero bits for the rest."""
    cs = 65536
    sc = cs // 32
    size = 40 << 20
    base = qemu.create(tmp_path / "base.qcow2", size, opts=[f"cluster_size={cs}"])
    qemu.io(base, f"write -P 1 0 {size}")
    top = qemu.create(tmp_path / "top.qcow2", size, backing="base.qcow2",
                      opts=[f"cluster_size={cs},extended_l2=on"])
    last = 30 << 20
    qemu.io(top, f"write -c -P 3 0 {cs}", f"write -c -P 3 {last} {cs}",
            f"write -P 4 {cs + 3 * sc} {sc}")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    start = 3 * sc if where in ("head", "both") else cs
    end = last + 3 * sc if where in ("tail", "both") else last
    run_both(qemu, top, ref, [(start, end - start)], True)
    assert_same(qemu, top, ref)


def test_zero_write_to_disk_end(tmp_path, qemu):
    """The disk's last subcluster counts whole up to the disk's end."""
    cs = 65536
    sc = cs // 32
    top, ref, size = build(qemu, tmp_path, cs, False)
    run_both(qemu, top, ref, [(size - 2 * sc + 5, 2 * sc - 5), (size - 5 * sc + 7, 100)],
             True)
    assert_same(qemu, top, ref)


def test_zero_write_without_backing(tmp_path, qemu):
    """With no backing file an unallocated subcluster reads zeros: a part-covered one
    becomes a zero subcluster unless the top has data in the rest of it."""
    cs = 65536
    sc = cs // 32
    top = qemu.create(tmp_path / "top.qcow2", 4 * cs,
                      opts=[f"cluster_size={cs},extended_l2=on"])
    qemu.io(top, f"write -P 3 {cs + 3 * sc} 5", f"write -P 3 {2 * cs + 9 * sc} {sc}")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    run_both(qemu, top, ref, [(3 * sc + 5, 10), (cs + 3 * sc + 5, 10),
                              (2 * cs + 3 * sc + 5, 4 * sc)], True)
    assert_same(qemu, top, ref)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_standard_l2_zero_writes_in_part(tmp_path, qemu, compat):
    """The same rule for standard L2 entries, whose unit is the cluster: a cluster a
    zero write covers in part becomes a zero cluster (v3) when it is unallocated or
    zero and the rest of it reads zeros already, else takes zero data; on v2 without a
    backing file an unallocated one stays unallocated. The disk ends inside its last
    cluster, which counts whole up to the disk's end."""
    cs = 65536
    size = 9 * cs - 4096
    backed = compat == "1.1"
    top = str(tmp_path / "top.qcow2")
    if backed:
        base = qemu.create(tmp_path / "base.qcow2", size, opts=[f"cluster_size={cs}"])
        qemu.io(base, f"write -P 1 0 {3 * cs}", f"write -z {3 * cs} {cs}")
        qemu.create(top, size, backing="base.qcow2", opts=[f"cluster_size={cs}"])
        qemu.io(top, f"write -z {5 * cs} {cs}", f"write -c -P 3 {6 * cs} {cs}",
                f"write -P 4 {7 * cs} {cs}")
    else:
        qemu.create(top, size, opts=[f"cluster_size={cs},compat=0.10"])
        qemu.io(top, f"write -c -P 3 {6 * cs} {cs}", f"write -P 4 {7 * cs} {cs}")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    # over data below, over a zero and an unallocated cluster below, into a zero
    # cluster, a compressed one, one with data, and to the disk's end
    pieces = [(c * cs + 100, 1000) for c in range(8)] + [
        (3 * cs + 5000, cs), (8 * cs + 512, size - 8 * cs - 512)]
    run_both(qemu, top, ref, pieces, True)
    assert_same(qemu, top, ref)


def test_zero_write_over_raw_holes(tmp_path, qemu):
    """A raw backing's holes read zeros by block status, its data does not: a partly
    covered subcluster over a hole becomes a zero subcluster, one over data (even over
    a single data block of the raw file) takes zero data."""
    cs = 65536
    sc = cs // 32
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(1 << 20)
        f.seek(cs)
        f.write(b"abc")
    top = qemu.create(tmp_path / "top.qcow2", 1 << 20, backing="base.raw", backing_fmt="raw",
                      opts=[f"cluster_size={cs},extended_l2=on"])
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    run_both(qemu, top, ref, [(cs + 10, 10), (cs + 5 * sc + 10, 10),
                              (3 * cs + 5 * sc + 10, 10), (cs + 20 * sc + 10, 10)], True)
    assert_same(qemu, top, ref)


def test_external_data_file(tmp_path, qemu):
    """The same rules with an external data file (subclusters at their guest offsets):
    partly covered zero writes over data, zeros and zero subclusters below, into the
    top's own data, and a small data write."""
    cs = 65536
    sc = cs // 32
    base = qemu.create(tmp_path / "base.qcow2", 1 << 20)
    qemu.io(base, f"write -P 1 0 {2 * cs}", f"write -z {2 * cs} {cs}")
    top = qemu.create(tmp_path / "top.qcow2", 1 << 20, backing="base.qcow2",
                      opts=[f"extended_l2=on,data_file={tmp_path / 'top.data'}"])
    qemu.io(top, f"write -P 3 {cs + 9 * sc} {sc}", f"write -z {3 * cs + 2 * sc} {4 * sc}")
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(top, ref)
    shutil.copy(tmp_path / "top.data", tmp_path / "ref.data")
    qemu.img("amend", "-o", f"data_file={tmp_path / 'ref.data'}", ref)
    pieces = [(c * cs + 3 * sc + 5, 10) for c in (1, 2, 3)] + [(cs + 9 * sc + 5, 10)]
    run_both(qemu, top, ref, pieces, True)
    run_both(qemu, top, ref, [(4 * cs + 3 * sc + 5, 10)], False)
    assert_same(qemu, top, ref)
