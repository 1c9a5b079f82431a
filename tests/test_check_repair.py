"""``check`` never harms: it counts every structure ``qemu-img check`` counts (header and
extensions, L1/L2, refcount table and blocks, snapshot table and snapshot L1/L2s, bitmap
directory, tables and data, the encryption header), so ``check -r leaks`` on any image
shape leaves ``qemu-img check`` clean and the data unchanged; and it refuses to repair
what it does not understand ("check incomplete", exit 1)."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess

import pytest

import blockpull
import qcow2_edit as q
from relhelp import PY, child_env

SECRET = ["--object", "secret,id=sec0,data=blockpull-test"]


def qemu_check_json(qemu, path, raw_args=()):
    spec = [str(path)]
    if raw_args:   # encrypted: qemu-img needs the key even to check
        spec = [*raw_args, f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
    r = qemu.img("check", "--output=json", *spec, check=False)
    assert r.stdout.strip(), r.stderr
    return r.returncode, json.loads(r.stdout)


def bitmaps_of(qemu, path):
    info = qemu.info(path)
    return [(b["name"], b["flags"]) for b in info["format-specific"]["data"].get("bitmaps", [])]


# ---- image shapes: each builds one image in tmp_path and returns (path, raw_args) --------
# raw_args: how qemu-img convert reads it (extra arguments before the file)


def _plain(qemu, d, opts, size=8 << 20):
    p = qemu.create(d / "i.qcow2", size, opts=opts)
    qemu.io(p, "write -P 1 0 1M", "write -z 2M 1M", "write -P 2 3M 64k",
            "write -P 3 5M 4k", "discard 5M 64k" if "compat=0.10" not in ",".join(opts) else
            "write -P 4 7M 64k")
    return p, []


def s_v3(qemu, d):
    return _plain(qemu, d, [])


def s_v2(qemu, d):
    return _plain(qemu, d, ["compat=0.10"])


def s_small_clusters_1bit(qemu, d):
    return _plain(qemu, d, ["cluster_size=512,refcount_bits=1"])


def s_refcount_2bit(qemu, d):
    return _plain(qemu, d, ["cluster_size=4096,refcount_bits=2"])


def s_refcount_64bit(qemu, d):
    return _plain(qemu, d, ["refcount_bits=64"])


def s_2m_clusters(qemu, d):
    return _plain(qemu, d, ["cluster_size=2M"])


def s_extended_l2(qemu, d):
    return _plain(qemu, d, ["extended_l2=on,cluster_size=32k"])


def s_lazy_refcounts(qemu, d):
    return _plain(qemu, d, ["lazy_refcounts=on"])


def s_prealloc_metadata(qemu, d):
    p = qemu.create(d / "i.qcow2", 8 << 20, opts=["preallocation=metadata"])
    qemu.io(p, "write -P 1 64k 64k")
    return p, []


def _compressed(qemu, d, ctype):
    src = qemu.create(d / "src.qcow2", 8 << 20)
    qemu.io(src, "write -P 1 0 2M", "write -P 2 4M 100k")
    p = str(d / "i.qcow2")
    qemu.img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, p)
    qemu.io(p, "write -P 3 64k 4k")          # a compressed cluster rewritten
    return p, []


def s_compressed_zlib(qemu, d):
    return _compressed(qemu, d, "zlib")


def s_compressed_zstd(qemu, d):
    return _compressed(qemu, d, "zstd")


def s_snapshots(qemu, d):
    p, _ = _plain(qemu, d, [])
    qemu.img("snapshot", "-c", "s1", p)
    qemu.io(p, "write -P 9 0 128k", "write -P 8 6M 64k")
    qemu.img("snapshot", "-c", "s2", p)
    qemu.io(p, "write -P 7 64k 4k")
    return p, []


def s_bitmaps(qemu, d):
    p = qemu.create(d / "i.qcow2", 64 << 20)
    qemu.img("bitmap", "--add", p, "b0")
    qemu.img("bitmap", "--add", "-g", "512", p, "fine")
    qemu.img("bitmap", "--add", "--disable", p, "off")
    qemu.io(p, "write 1M 64k", "write -P 5 40M 1M")
    return p, []


def s_bitmaps_multi_cluster(qemu, d):
    p = qemu.create(d / "i.qcow2", 8 << 20, opts=["cluster_size=512"])
    qemu.img("bitmap", "--add", "-g", "512", p, "b0")
    qemu.io(p, "write -P 1 0 64k", "write -P 2 3M 64k", "write -P 3 7M 4k")
    return p, []


def s_bitmaps_written_by_blockpull(qemu, d):
    p = qemu.create(d / "i.qcow2", 8 << 20, opts=["cluster_size=512"])
    qemu.img("bitmap", "--add", "-g", "512", p, "b0")
    qemu.img("bitmap", "--add", p, "b1")
    for off in (0, 3 << 20, 7 << 20):
        with blockpull.open(p) as img:
            img.write(off, b"\x06" * 70000)
    return p, []


def s_pulled_with_snapshot_and_bitmap(qemu, d):
    base = qemu.create(d / "base.qcow2", 8 << 20)
    qemu.io(base, "write -P 1 0 8M")
    p = qemu.create(d / "i.qcow2", 8 << 20, backing="base.qcow2")
    qemu.io(p, "write -P 2 1M 64k")
    qemu.img("snapshot", "-c", "s1", p)
    qemu.img("bitmap", "--add", p, "b0")
    with blockpull.open(p) as img:
        img.write(5 << 20, b"\x03" * 4096)
        img.pull().result()
    return p, []


def s_overlay(qemu, d):
    base = qemu.create(d / "base.qcow2", 8 << 20)
    qemu.io(base, "write -P 1 0 8M")
    p = qemu.create(d / "i.qcow2", 8 << 20, backing="base.qcow2")
    qemu.io(p, "write -P 2 100k 10k", "write -z 3M 64k")
    return p, []


def s_luks(qemu, d):
    p = str(d / "i.qcow2")
    for _ in range(20):
        # QEMU times its key derivation with getrusage(); on a busy machine it may
        # measure 0 ms and refuse ("Unable to get accurate CPU usage"): try again
        r = qemu.img("create", "-q", "-f", "qcow2", *SECRET, "-o",
                     "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                     p, "8M", check=False)
        if r.returncode == 0:
            break
        assert "accurate CPU usage" in r.stderr, r.stderr
        if os.path.exists(p):
            os.unlink(p)
    else:
        raise AssertionError("qemu-img could not create a LUKS image: " + r.stderr)
    return p, SECRET + ["--image-opts"]


SHAPES = {f.__name__[2:]: f for f in [
    s_v3, s_v2, s_small_clusters_1bit, s_refcount_2bit, s_refcount_64bit, s_2m_clusters,
    s_extended_l2, s_lazy_refcounts, s_prealloc_metadata, s_compressed_zlib,
    s_compressed_zstd, s_snapshots, s_bitmaps, s_bitmaps_multi_cluster,
    s_bitmaps_written_by_blockpull, s_pulled_with_snapshot_and_bitmap, s_overlay, s_luks]}


def to_raw(qemu, path, raw_args, out):
    if raw_args:
        spec = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
        qemu.img("convert", *raw_args, spec, "-O", "raw", str(out))
    else:
        qemu.img("convert", "-O", "raw", str(path), str(out))
    with open(out, "rb") as f:
        return f.read()


def add_leak(path):
    """Grow the file by one cluster and count it: a leak, as a crash leaves one."""
    h = q.header(path)
    cs = 1 << h["cluster_bits"]
    size = os.path.getsize(path)
    c = (size + cs - 1) // cs
    with open(path, "r+b") as f:
        f.truncate((c + 1) * cs)
    order = h.get("refcount_order", 4) if h["version"] == 3 else 4
    bits = 1 << order
    per_block = cs * 8 // bits
    rte = q.peek(path, h["refcount_table_offset"] + 8 * (c // per_block), ">Q")
    assert rte, "no refcount block covers the new cluster"
    if bits >= 8:
        q.poke(path, rte + (c % per_block) * bits // 8, q._FMT[bits], 1)
    else:
        bit = (c % per_block) * bits
        b = q.peek(path, rte + bit // 8, ">B")
        q.poke(path, rte + bit // 8, ">B", b | (1 << (bit % 8)))


@pytest.mark.parametrize("leak", [False, True], ids=["clean", "leaked"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_repair_leaks_on_every_shape(tmp_path, qemu, shape, leak):
    if shape == "compressed_zstd":
        pytest.importorskip("zstandard")
    path, raw_args = SHAPES[shape](qemu, tmp_path)
    if leak:
        add_leak(path)
    want_raw = to_raw(qemu, path, raw_args, tmp_path / "before.raw")
    want_bitmaps = bitmaps_of(qemu, path)
    rc, d = qemu_check_json(qemu, path, raw_args)
    assert rc == (3 if leak else 0) and not d.get("corruptions"), d
    r = blockpull.check(path)
    assert (r.corruptions, r.leaks, r.check_errors) == (0, d.get("leaks", 0), 0), r.messages
    r = blockpull.check(path, repair=True)
    assert (r.corruptions, r.leaks, r.check_errors, r.leaks_fixed) == (0, 0, 0, int(leak))
    assert qemu_check_json(qemu, path, raw_args)[0] == 0
    assert blockpull.check(path).clean
    assert to_raw(qemu, path, raw_args, tmp_path / "after.raw") == want_raw
    assert bitmaps_of(qemu, path) == want_bitmaps
    assert "inconsistent" not in qemu.img("info", "-U", path).stderr


def test_bitmap_clusters_are_not_leaks(tmp_path, qemu):
    """The reported case: the bitmap directory, table and data are in use, not leaked."""
    p = qemu.create(tmp_path / "i.qcow2", 64 << 20)
    qemu.img("bitmap", "--add", p, "b0")
    qemu.io(p, "write 1M 64k")
    qemu.assert_clean(p)
    before = open(p, "rb").read()
    r = subprocess.run([PY, "-m", "blockpull", "check", p], capture_output=True, text=True,
                       env=child_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Leaked" not in r.stdout and "No errors were found" in r.stdout
    r = subprocess.run([PY, "-m", "blockpull", "check", "-r", "leaks", p],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert open(p, "rb").read() == before
    qemu.io(p, "write 2M 64k")                     # QEMU writes without complaint
    qemu.assert_clean(p)
    assert bitmaps_of(qemu, p) == [("b0", ["auto"])]


def _bitmap_dir_entry(path):
    with open(path, "rb") as f:
        head = f.read(4096)
    off = struct.unpack(">I", head[100:104])[0]
    while True:
        etype, elen = struct.unpack(">II", head[off:off + 8])
        assert etype, "no bitmaps extension"
        if etype == 0x23852875:
            return struct.unpack(">Q", head[off + 24:off + 32])[0]
        off += 8 + ((elen + 7) & ~7)


@pytest.mark.parametrize("damage", ["flags", "extra_data", "table_entry"])
def test_unknown_bitmap_structure_is_check_incomplete(tmp_path, qemu, damage):
    """A bitmap structure that is not understood may own clusters: the check says it is
    incomplete (exit 1) and repairs nothing, even with a real leak present."""
    p = qemu.create(tmp_path / "i.qcow2", 64 << 20)
    qemu.img("bitmap", "--add", p, "b0")
    qemu.io(p, "write 1M 64k")
    add_leak(p)
    doff = _bitmap_dir_entry(p)
    if damage == "flags":
        q.poke(p, doff + 12, ">I", 2 | 1 << 7)
    elif damage == "extra_data":
        q.poke(p, doff + 20, ">I", 8)
    else:
        table = q.peek(p, doff, ">Q")
        q.poke(p, table, ">Q", 1 << 60)
    before = open(p, "rb").read()
    r = blockpull.check(p, repair=True)
    assert r.exit_code == 1 and r.leaks_fixed == 0
    assert any("check incomplete" in m for m in r.messages)
    assert open(p, "rb").read() == before
    r = subprocess.run([PY, "-m", "blockpull", "check", "-r", "leaks", p],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 1 and "check incomplete" in r.stdout
    assert open(p, "rb").read() == before


def test_bitmaps_without_autoclear_bit_are_leaks_like_qemu(tmp_path, qemu):
    """Autoclear bit 0 clear: QEMU holds the bitmaps void and counts their clusters as
    leaks; so does check, and repairing them leaves qemu-img check clean."""
    p = qemu.create(tmp_path / "i.qcow2", 64 << 20)
    qemu.img("bitmap", "--add", p, "b0")
    qemu.io(p, "write -P 1 1M 64k")
    q.set_field(p, "autoclear_features", 0)
    rc, d = qemu_check_json(qemu, p)
    r = blockpull.check(p)
    assert rc == 3 and (r.leaks, r.corruptions) == (d["leaks"], 0)
    want = to_raw(qemu, p, [], tmp_path / "a.raw")
    r = blockpull.check(p, repair=True)
    assert r.leaks_fixed == d["leaks"] and r.exit_code == 0
    qemu.assert_clean(p)
    assert to_raw(qemu, p, [], tmp_path / "b.raw") == want


def test_unreadable_l2_is_check_incomplete(tmp_path, qemu):
    """An L2 table the walk cannot follow hides the data clusters it references: they
    look leaked, and freeing them would lose them. No repair then."""
    p = qemu.create(tmp_path / "i.qcow2", 8 << 20)
    qemu.io(p, "write -P 1 0 1M")
    add_leak(p)
    l1pos = q.l1_entry_pos(p, 0)
    e = q.peek(p, l1pos, ">Q")
    q.poke(p, l1pos, ">Q", e + 512)                # unaligned L2 offset
    before = open(p, "rb").read()
    r = blockpull.check(p, repair=True)
    assert r.leaks_fixed == 0 and r.corruptions
    assert any("leaks not repaired" in m for m in r.messages)
    assert open(p, "rb").read() == before


def test_repair_leaks_on_qed(tmp_path, qemu):
    """QED has no refcounts: check -r leaks changes nothing, and QEMU agrees it is sound."""
    base = qemu.create(tmp_path / "base.qcow2", 8 << 20)
    qemu.io(base, "write -P 1 0 8M")
    p = qemu.create(tmp_path / "i.qed", 8 << 20, fmt="qed", backing="base.qcow2")
    qemu.io(p, "write -P 2 1M 64k", "write -z 3M 64k", fmt="qed")
    before = open(p, "rb").read()
    r = blockpull.check(p, repair=True)
    assert r.exit_code == 0 and r.leaks_fixed == 0
    assert open(p, "rb").read() == before
    assert qemu.check(p, fmt="qed") == 0
