"""Malformed qcow2 images: each raises a named error at open or at the first read/map,
in under a second, under a 2 GiB address-space limit, without reading outside the file.

Every case starts from a real image that qemu-img made and corrupts one field or entry.
The open runs in a child process (tests/hostile_child.py) so that a crash, a hang or a
runaway allocation fails the test instead of killing the run.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import qcow2_edit as q
from relhelp import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
MASK = 0x00FFFFFFFFFFFE00
FMT_ERR = "ImageFormatError"
CHAIN_ERR = "BackingChainError"
EITHER = (FMT_ERR, CHAIN_ERR)   # what the name says is judged by the chain, where it lies by the format


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Real images: plain v3 with data, a compressed and a zero cluster; v2; zstd;
    one with an internal snapshot; one with a backing file."""
    from conftest import Qemu, have_qemu
    if not have_qemu():
        pytest.fail("qemu-img/qemu-io are required (apt-get install qemu-utils)")
    qm = Qemu()
    d = tmp_path_factory.mktemp("orig")
    v3 = qm.create(d / "v3.qcow2", 4 << 20)
    qm.io(v3, "write -P 1 0 64k", "write -c -P 2 1M 64k", "write -z 2M 64k")
    v2 = qm.create(d / "v2.qcow2", 4 << 20, opts=["compat=0.10"])
    qm.io(v2, "write -P 1 0 64k")
    zstd = qm.create(d / "zstd.qcow2", 4 << 20, opts=["compression_type=zstd"])
    qm.io(zstd, "write -c -P 3 1M 64k")
    snap = qm.create(d / "snap.qcow2", 4 << 20)
    qm.io(snap, "write -P 1 0 64k")
    qm.img("snapshot", "-c", "s1", snap)
    qm.img("snapshot", "-c", "s2", snap)
    qed = qm.create(d / "q.qed", 4 << 20, fmt="qed")
    qm.io(qed, "write -P 1 0 64k", fmt="qed")
    base = qm.create(d / "base.qcow2", 4 << 20)
    top = qm.create(d / "top.qcow2", 4 << 20, backing="base.qcow2")
    return {"v3": v3, "v2": v2, "zstd": zstd, "snap": snap, "top": top, "base": base,
            "qed": qed}


def run_child(path, mode="read"):
    env = child_env(HERE)
    try:
        r = subprocess.run([sys.executable, os.path.join(HERE, "hostile_child.py"), str(path), mode],
                           capture_output=True, text=True, timeout=20, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{path}: open/map/read hung (no answer in 20 s)")
    assert r.returncode == 0, f"child died ({r.returncode}) on {path}:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the mutations: each takes (path, tmpdir) and corrupts the copy at path ----------

def field(name, value):
    return lambda p, d: q.set_field(p, name, value)


def l1_entry(value):
    return lambda p, d: q.poke(p, q.l1_entry_pos(p, 0), ">Q", value)


def l2_at(vaddr, make):
    def mutate(p, d):
        q.poke(p, q.l2_entry_pos(p, vaddr), ">Q", make(q.l2_entry(p, vaddr)))
    return mutate


def backing_name(name: bytes):
    """Rewrite the backing name (in place, after the header extensions)."""
    def mutate(p, d):
        h = q.header(p)
        off = h["backing_file_offset"]
        with open(p, "r+b") as f:
            f.seek(off)
            f.write(name)
        q.set_field(p, "backing_file_size", len(name))
    return mutate


def garbage_compressed(p, d):
    e = q.l2_entry(p, 1 << 20)
    coff = e & ((1 << 54) - 1)
    with open(p, "r+b") as f:
        f.seek(coff)
        f.write(bytes(range(7, 250)) * 2)


def snapshot_entry(offset_in_entry, fmt, value):
    def mutate(p, d):
        q.poke(p, q.header(p)["snapshots_offset"] + offset_in_entry, fmt, value)
    return mutate


def snapshots_share_one_big_l1(p, d):
    # two snapshots name the same L1 table, each as large as the file allows: loading
    # every snapshot's L1 must not cost more memory than the file holds
    from blockpull._check import parse_snapshot_table
    from blockpull._fileio import File
    h = q.header(p)
    f = File(p)
    try:
        snaps, _n = parse_snapshot_table(f, h["snapshots_offset"], h["nb_snapshots"],
                                         h["cluster_bits"], f.size())
    finally:
        f.close()
    size = os.path.getsize(p)
    n = (size - 0x10000) // 8
    for (_off, _size, _id, _name, pos) in snaps:
        q.poke(p, pos, ">Q", 0x10000)
        q.poke(p, pos + 8, ">I", n)


def truncate(n):
    def mutate(p, d):
        with open(p, "r+b") as f:
            f.truncate(n)
    return mutate


def overrunning_extension(p, d):
    # the first extension (feature table) claims to run past the header cluster
    q.poke(p, q.header(p)["header_length"] + 4, ">I", 70000)


def self_loop(p, d):
    backing_name(os.path.basename(p).encode())(p, d)


def two_loop(p, d):
    other = os.path.join(d, "other.qcow2")
    shutil.copy(p, other)
    backing_name(os.path.basename(p).encode())(other, d)
    backing_name(b"other.qcow2")(p, d)


def fill_l1_with_one_table(p, d):
    # every L1 entry names the same L2 table and the disk claims the largest size those
    # entries cover: answers must stay bounded in time
    h = q.header(p)
    l2 = q.peek(p, h["l1_table_offset"], ">Q")
    n = 8192
    with open(p, "r+b") as f:
        f.seek(h["l1_table_offset"])
        f.write(b"".join([l2.to_bytes(8, "big")] * n))
    q.set_field(p, "l1_size", n)
    q.set_field(p, "size", n << 29)
    # and the L2 table points every entry past the end of the file
    e_pos = q.l2_entry_pos(p, 0)
    q.poke(p, e_pos + 8, ">Q", (1 << 50) | 1 << 63)


CASES = [
    # header
    ("magic", "v3", field("magic", 0x51464900), FMT_ERR),
    ("version_1", "v3", field("version", 1), FMT_ERR),
    ("version_4", "v3", field("version", 4), FMT_ERR),
    ("cluster_bits_0", "v3", field("cluster_bits", 0), FMT_ERR),
    ("cluster_bits_8", "v3", field("cluster_bits", 8), FMT_ERR),
    ("cluster_bits_22", "v3", field("cluster_bits", 22), FMT_ERR),
    ("cluster_bits_63", "v3", field("cluster_bits", 63), FMT_ERR),
    ("size_2_63", "v3", field("size", 1 << 63), FMT_ERR),
    ("size_past_l1", "v3", field("size", 1 << 40), FMT_ERR),
    ("l1_size_huge", "v3", field("l1_size", 0xFFFFFFFF), FMT_ERR),
    ("l1_size_past_eof", "v3", field("l1_size", 1 << 20), FMT_ERR),
    ("l1_size_zero", "v3", field("l1_size", 0), FMT_ERR),
    ("l1_offset_unaligned", "v3", field("l1_table_offset", 0x30008), FMT_ERR),
    ("l1_offset_zero", "v3", field("l1_table_offset", 0), FMT_ERR),
    ("l1_offset_past_eof", "v3", field("l1_table_offset", 1 << 40), FMT_ERR),
    ("l1_offset_2_64", "v3", field("l1_table_offset", (1 << 64) - 65536), FMT_ERR),
    ("reftable_unaligned", "v3", field("refcount_table_offset", 0x10200), FMT_ERR),
    ("reftable_past_eof", "v3", field("refcount_table_offset", 1 << 45), FMT_ERR),
    ("reftable_clusters_0", "v3", field("refcount_table_clusters", 0), FMT_ERR),
    ("reftable_clusters_huge", "v3", field("refcount_table_clusters", 0xFFFFFFFF), FMT_ERR),
    ("reftable_clusters_past_eof", "v3", field("refcount_table_clusters", 100), FMT_ERR),
    ("refcount_order_7", "v3", field("refcount_order", 7), FMT_ERR),
    ("header_length_small", "v3", field("header_length", 96), FMT_ERR),
    ("header_length_odd", "v3", field("header_length", 109), FMT_ERR),
    ("header_length_huge", "v3", field("header_length", 0xFFFFFFF8), FMT_ERR),
    ("incompat_unknown", "v3", field("incompatible_features", 1 << 5), FMT_ERR),
    ("incompat_bit_63", "v3", field("incompatible_features", 1 << 63), FMT_ERR),
    ("incompat_data_file", "v3", field("incompatible_features", 4), FMT_ERR),
    ("compression_type_2", "v3", lambda p, d: (q.set_field(p, "incompatible_features", 8),
                                               q.poke(p, 104, ">B", 2)), FMT_ERR),
    ("compression_type_without_bit", "v3", lambda p, d: q.poke(p, 104, ">B", 1), FMT_ERR),
    ("crypt_aes", "v3", field("crypt_method", 1), FMT_ERR),
    ("crypt_luks", "v3", field("crypt_method", 2), FMT_ERR),
    ("extension_overruns_cluster", "v3", overrunning_extension, FMT_ERR),
    ("truncated_header", "v3", truncate(50), FMT_ERR),
    ("truncated_v3_header", "v3", truncate(90), FMT_ERR),
    ("empty_file", "v3", truncate(0), FMT_ERR),
    ("truncated_tables", "v3", truncate(70000), FMT_ERR),
    # backing name
    ("backing_offset_past_cluster", "top", field("backing_file_offset", 70000), FMT_ERR),
    ("backing_offset_2_64", "top", field("backing_file_offset", (1 << 64) - 8), FMT_ERR),
    ("backing_offset_in_header", "top", field("backing_file_offset", 8), FMT_ERR),
    ("backing_size_zero", "top", field("backing_file_size", 0), EITHER),
    ("backing_size_2000", "top", field("backing_file_size", 2000), EITHER),
    ("backing_name_nul", "top", backing_name(b"base\0.qcow2"), EITHER),
    ("backing_protocol", "top", backing_name(b"nbd://evil:10809/x"), CHAIN_ERR),
    ("backing_json", "top", backing_name(b'json:{"file.filename":"/etc/passwd"}'), CHAIN_ERR),
    ("backing_missing", "top", backing_name(b"nothere.qcow2"), CHAIN_ERR),
    ("backing_loop_self", "top", self_loop, CHAIN_ERR),
    ("backing_loop_two", "top", two_loop, CHAIN_ERR),
    # L1 / L2 entries (found at the first map or read)
    ("l2_offset_unaligned", "v3", lambda p, d: q.poke(p, q.l1_entry_pos(p, 0), ">Q",
                                                      q.peek(p, q.l1_entry_pos(p, 0), ">Q") + 512), FMT_ERR),
    ("l2_offset_past_eof", "v3", l1_entry((1 << 44) | 1 << 63), FMT_ERR),
    ("data_unaligned", "v3", l2_at(0, lambda e: e + 512), FMT_ERR),
    ("data_past_eof", "v3", l2_at(0, lambda e: (1 << 50) | 1 << 63), FMT_ERR),
    ("v2_data_past_eof", "v2", l2_at(0, lambda e: (1 << 40) | 1 << 63), FMT_ERR),
    ("compressed_past_eof", "v3", l2_at(1 << 20, lambda e: (1 << 62) | (1 << 40)), FMT_ERR),
    ("compressed_max_span_past_eof", "v3", l2_at(1 << 20, lambda e: (1 << 62) | (0xFF << 54) | 0x5FE00), FMT_ERR),
    ("compressed_garbage", "v3", garbage_compressed, FMT_ERR),
    ("zstd_garbage", "zstd", garbage_compressed, FMT_ERR),
    ("one_l2_everywhere", "v3", fill_l1_with_one_table, FMT_ERR),
    # snapshot table
    ("snapshots_offset_unaligned", "snap", lambda p, d: q.set_field(
        p, "snapshots_offset", q.header(p)["snapshots_offset"] + 8), FMT_ERR),
    ("snapshots_offset_past_eof", "snap", field("snapshots_offset", 1 << 50), FMT_ERR),
    ("nb_snapshots_huge", "snap", field("nb_snapshots", 0xFFFFFFFF), FMT_ERR),
    ("nb_snapshots_past_table", "snap", field("nb_snapshots", 60000), FMT_ERR),
    ("snapshot_l1_past_eof", "snap", snapshot_entry(0, ">Q", 1 << 40), FMT_ERR),
    ("snapshot_l1_unaligned", "snap", snapshot_entry(0, ">Q", 0x30100), FMT_ERR),
    ("snapshot_l1_size_huge", "snap", snapshot_entry(8, ">I", 0xFFFFFFFF), FMT_ERR),
    ("snapshot_extra_data_huge", "snap", snapshot_entry(36, ">I", 0xFFFFFFF0), FMT_ERR),
    ("snapshots_share_one_big_l1", "snap", snapshots_share_one_big_l1, FMT_ERR),
    ("snapshot_names_past_eof", "snap", snapshot_entry(12, ">H", 0xFFFF), FMT_ERR),
]

def qed_field(off, fmt, value):
    return lambda p, d: q.poke(p, off, fmt, value)


def qed_l2_entry(value):
    def mutate(p, d):
        l1 = q.peek(p, 40, "<Q")
        l2 = q.peek(p, l1, "<Q")
        q.poke(p, l2, "<Q", value)
    return mutate


CASES += [
    ("qed_magic", "qed", qed_field(0, "<I", 0x00444551 ^ 0xFF), FMT_ERR),
    ("qed_cluster_size_3000", "qed", qed_field(4, "<I", 3000), FMT_ERR),
    ("qed_cluster_size_huge", "qed", qed_field(4, "<I", 1 << 31), FMT_ERR),
    ("qed_table_size_0", "qed", qed_field(8, "<I", 0), FMT_ERR),
    ("qed_table_size_huge", "qed", qed_field(8, "<I", 0xFFFFFFFF), FMT_ERR),
    ("qed_header_size_huge", "qed", qed_field(12, "<I", 0xFFFFFFFF), FMT_ERR),
    ("qed_unknown_feature", "qed", qed_field(16, "<Q", 1 << 40), FMT_ERR),
    ("qed_l1_past_eof", "qed", qed_field(40, "<Q", 1 << 50), FMT_ERR),
    ("qed_l1_unaligned", "qed", qed_field(40, "<Q", 0x10200), FMT_ERR),
    ("qed_image_size_odd", "qed", qed_field(48, "<Q", (4 << 20) + 3), FMT_ERR),
    ("qed_image_size_huge", "qed", qed_field(48, "<Q", 1 << 63), FMT_ERR),
    ("qed_l2_entry_past_eof", "qed", qed_l2_entry(1 << 50), FMT_ERR),
    ("qed_l2_entry_unaligned", "qed", qed_l2_entry(0x30200), FMT_ERR),
]

WRITE_CASES = [
    # refcount metadata is only used when writing
    ("refblock_unaligned", "v3", lambda p, d: q.poke(p, q.header(p)["refcount_table_offset"],
                                                     ">Q", 0x20200), FMT_ERR),
    ("refblock_past_eof", "v3", lambda p, d: q.poke(p, q.header(p)["refcount_table_offset"],
                                                    ">Q", 1 << 44), FMT_ERR),
    # a dirty image is repaired on a writable open; one whose refcount table names an
    # unaligned block cannot be (a corruption besides stale counts) and is refused
    ("dirty_bit_refblock_unaligned", "v3", lambda p, d: (
        q.set_field(p, "incompatible_features", 1),
        q.poke(p, q.header(p)["refcount_table_offset"], ">Q", 0x20200)), FMT_ERR),
    ("corrupt_bit_for_writing", "v3", field("incompatible_features", 2), FMT_ERR),
]


def _run_case(tmp_path, originals, src, mutate, want, mode):
    p = tmp_path / ("bad.qed" if src == "qed" else "bad.qcow2")
    shutil.copy(originals[src], p)
    if src == "top":
        shutil.copy(originals["base"], tmp_path / "base.qcow2")
    mutate(str(p), str(tmp_path))
    out = run_child(p, mode)
    assert not out["ok"], f"malformed image opened and read without error: {out}"
    assert out["type"] in ((want,) if isinstance(want, str) else want), out
    assert "\n" not in out["msg"] and str(tmp_path) in out["msg"], out["msg"]
    assert out["seconds"] < 1.0, out
    assert out["outside"] == [], f"read outside the file: {out['outside']}"
    assert out["check"] in (1, 2, 3, FMT_ERR, "ImageLockedError", 0), out
    return out


def test_enough_distinct_cases():
    names = [c[0] for c in CASES + WRITE_CASES]
    assert len(set(names)) == len(names) >= 30


@pytest.mark.parametrize("name,src,mutate,want", CASES, ids=[c[0] for c in CASES])
def test_hostile_read(tmp_path, originals, name, src, mutate, want):
    _run_case(tmp_path, originals, src, mutate, want, "read")


@pytest.mark.parametrize("name,src,mutate,want", WRITE_CASES, ids=[c[0] for c in WRITE_CASES])
def test_hostile_write(tmp_path, originals, name, src, mutate, want):
    _run_case(tmp_path, originals, src, mutate, want, "write")


def test_unmodified_originals_read_cleanly(tmp_path, originals):
    """The harness itself: untouched images must open, read and check clean."""
    for key in ("v3", "v2", "zstd", "snap"):
        out = run_child(originals[key], "read")
        assert out["ok"] and out["check"] == 0 and out["outside"] == [], (key, out)
