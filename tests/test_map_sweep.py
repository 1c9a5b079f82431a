"""``blockpull map`` against ``qemu-img map`` over every shape of image the suite builds.

Each case builds a small chain with qemu-img/qemu-io (blockpull for the pulled ones) and
runs both maps from the images' directory, the top named as a user would name it: the
JSON output must parse to the same list, and the human output must be the same text
(qemu-img's own table, file names as the chain gives them) with the same exit status.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

import blockpull
import relhelp
import test_check_repair
from blockpull.cli.main import main as cli_main

KiB = 1 << 10
MiB = 1 << 20


def _raw(path, size, writes=()):
    """A sparse raw file of ``size`` bytes with ``(offset, bytes)`` written."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return str(path)


# ---- builders: each returns (top as named from the working directory, its qemu-img
# options); the working directory is the test's tmp_path ------------------------------


def b_plain_v3(q):
    q.create("t.qcow2", 4 * MiB)
    q.io("t.qcow2", "write -P 1 0 100k", "write -z 1M 64k", "write -c -P 2 2M 64k",
         "write -P 3 3M 4k")
    return "t.qcow2", []


def b_plain_v2(q):
    q.create("t.qcow2", 4 * MiB, opts=["compat=0.10"])
    q.io("t.qcow2", "write -P 1 0 100k", "write -z 1M 64k", "write -P 3 3M 4k")
    return "t.qcow2", []


def b_zero_alloc_and_discard(q):
    q.create("t.qcow2", 2 * MiB)
    q.io("t.qcow2", "write -P 1 0 1M", "write -z 128k 128k", "discard 512k 128k")
    return "t.qcow2", []


def b_cluster(bits):
    def build(q):
        cs = 1 << bits
        q.create("t.qcow2", max(4 * MiB, 8 * cs), opts=[f"cluster_size={cs}"])
        q.io("t.qcow2", "write -P 1 0 3k", f"write -z {cs * 4} {cs}",
             f"write -c -P 2 {6 * cs} {cs}", f"write -P 3 {5 * cs + 512} 512")
        return "t.qcow2", []
    return build


def b_chain(depth):
    def build(q):
        names = [f"l{i}.qcow2" for i in range(depth)]
        q.create(names[0], 4 * MiB)
        q.io(names[0], "write -P 1 0 2M", "write -c -P 9 3M 64k")
        for i in range(1, depth):
            q.create(names[i], 4 * MiB, backing=names[i - 1])
            q.io(names[i], f"write -P {i + 1} {i * 256}k 64k", f"write -z {i * 512}k 64k",
                 f"write -c -P 7 {2 * MiB + i * 128 * KiB} 64k")
        return names[-1], []
    return build


def b_chain_in_subdir(q):
    os.mkdir("d")
    q.create("d/base.qcow2", MiB)
    q.io("d/base.qcow2", "write -P 1 0 256k")
    q.create("d/mid.qcow2", MiB, backing="base.qcow2")
    q.io("d/mid.qcow2", "write -P 2 64k 64k")
    q.create("t.qcow2", MiB, backing="d/mid.qcow2")
    q.io("t.qcow2", "write -P 3 128k 64k")
    return "./t.qcow2", []


def b_raw_backing(size, writes=(), top_size=None):
    def build(q):
        _raw("b.raw", size, writes)
        q.create("t.qcow2", top_size or -(-size // 512) * 512, backing="b.raw",
                 backing_fmt="raw")
        q.io("t.qcow2", "write -P 5 32k 4k")
        return "t.qcow2", []
    return build


def b_raw_top(size, writes=()):
    def build(q):
        _raw("r.raw", size, writes)
        return "r.raw", ["-f", "raw"]
    return build


def b_backing_shorter(q):
    q.create("b.qcow2", MiB + 512)
    q.io("b.qcow2", "write -P 1 0 1M", "write -P 2 1M 512")
    q.create("t.qcow2", 3 * MiB, backing="b.qcow2")
    q.io("t.qcow2", "write -P 3 2M 64k")
    return "t.qcow2", []


def b_backing_longer(q):
    q.create("b.qcow2", 4 * MiB)
    q.io("b.qcow2", "write -P 1 0 4M")
    q.create("t.qcow2", MiB, backing="b.qcow2")
    q.io("t.qcow2", "write -P 3 512k 64k")
    return "t.qcow2", []


def b_prealloc(mode, ext=""):
    def build(q):
        opts = [f"preallocation={mode}"] + ([ext] if ext else [])
        q.create("t.qcow2", 4 * MiB, opts=opts)
        q.io("t.qcow2", "write -P 1 64k 4k", "write -P 2 1M 100k",
             f"write -P 3 {4 * MiB - 64 * KiB} 64k")
        return "t.qcow2", []
    return build


def b_prealloc_backing(q):
    q.create("b.qcow2", 2 * MiB, opts=["preallocation=metadata"])
    q.io("b.qcow2", "write -P 1 0 100k", f"write -P 2 {2 * MiB - 64 * KiB} 64k")
    q.create("t.qcow2", 2 * MiB, backing="b.qcow2")
    q.io("t.qcow2", "write -P 3 1M 64k")
    return "t.qcow2", []


def b_prealloc_extl2_backed(q):
    q.create("b.qcow2", 2 * MiB)
    q.io("b.qcow2", "write -P 1 0 2M")
    q.create("t.qcow2", 2 * MiB, backing="b.qcow2",
             opts=["preallocation=metadata", "extended_l2=on"])
    q.io("t.qcow2", "write -P 2 4k 4k", "write -P 3 1M 64k")
    return "t.qcow2", []


def b_prealloc_small_clusters(q):
    q.create("t.qcow2", MiB, opts=["preallocation=metadata", "cluster_size=512"])
    q.io("t.qcow2", "write -P 1 1000k 3k")
    return "t.qcow2", []


def b_extl2(cs, backed=False):
    def build(q):
        if backed:
            q.create("b.qcow2", 4 * MiB)
            q.io("b.qcow2", "write -P 1 0 4M")
        q.create("t.qcow2", 4 * MiB, backing="b.qcow2" if backed else None,
                 opts=["extended_l2=on", f"cluster_size={cs}"])
        sc = cs // 32
        q.io("t.qcow2", "write -P 2 0 512", f"write -z {3 * sc} {sc}",
             f"write -P 3 {cs + 5 * sc} {2 * sc}", f"write -P 4 {2 * MiB} 4k")
        return "t.qcow2", []
    return build


def b_snapshot(q):
    q.create("t.qcow2", 2 * MiB)
    q.io("t.qcow2", "write -P 1 0 1M")
    q.img("snapshot", "-c", "s1", "t.qcow2")
    q.io("t.qcow2", "write -P 2 256k 64k", "discard 512k 64k", "write -P 3 1M 64k")
    return "t.qcow2", []


def b_bitmaps(q):
    q.create("t.qcow2", 2 * MiB)
    q.img("bitmap", "--add", "t.qcow2", "b0")
    q.io("t.qcow2", "write -P 1 0 128k", "write -P 2 1M 64k")
    return "t.qcow2", []


def b_qed(backing=None):
    def build(q):
        if backing == "qed":
            q.create("b.qed", 4 * MiB, fmt="qed")
            q.io("b.qed", "write -P 1 0 1M", fmt="qed")
            q.img("create", "-q", "-f", "qed", "-b", "b.qed", "-F", "qed", "t.qed")
        elif backing == "raw":
            _raw("b.raw", 1000001, [(4096, b"x" * 5000), (999999, b"yz")])
            q.img("create", "-q", "-f", "qed", "-b", "b.raw", "-F", "raw", "t.qed",
                  str(2 * MiB))
        else:
            q.create("t.qed", 4 * MiB, fmt="qed")
        q.io("t.qed", "write -P 2 512k 64k", "write -P 3 1536k 4k", fmt="qed")
        return "t.qed", []
    return build


def b_qcow2_over_qed(q):
    q.create("b.qed", 2 * MiB, fmt="qed")
    q.io("b.qed", "write -P 1 0 1M", fmt="qed")
    q.create("t.qcow2", 2 * MiB, backing="b.qed", backing_fmt="qed")
    q.io("t.qcow2", "write -P 2 64k 64k")
    return "t.qcow2", []


def b_pulled_to_base(q):
    b_chain(3)(q)
    with blockpull.open("l2.qcow2") as img:
        img.pull(base="l0.qcow2").result(timeout=60)
    return "l2.qcow2", []


def b_pulled_whole(q):
    b_chain(2)(q)
    with blockpull.open("l1.qcow2") as img:
        img.pull().result(timeout=60)
    return "l1.qcow2", []


def b_relhelp(variant, pulled):
    """The reliability tests' chain ``variant`` (relhelp.build_chain), pulled to its base
    with ``pulled``."""
    def build(q):
        c = relhelp.build_chain("c", relhelp.VARIANTS[variant])
        if pulled:
            with blockpull.open(c["top"]) as img:
                img.pull(base=relhelp.VARIANTS[variant].base).result(timeout=60)
        return c["top"], []
    return build


def b_check_repair(name):
    """A shape test_check_repair checks and repairs (its s_* builders)."""
    def build(q):
        path, opts = getattr(test_check_repair, name)(q, Path("."))
        return os.path.relpath(path), opts
    return build


SHAPES = {
    "plain-v3": b_plain_v3,
    "plain-v2": b_plain_v2,
    "zero-alloc-discard": b_zero_alloc_and_discard,
    **{f"cluster-{1 << b}": b_cluster(b) for b in (9, 12, 16, 21)},
    **{f"chain-{n}": b_chain(n) for n in (1, 2, 3, 4)},
    "chain-subdir": b_chain_in_subdir,
    "raw-64k": b_raw_backing(64 * KiB),
    "raw-1000001": b_raw_backing(1000001),
    "raw-1000001-top-larger": b_raw_backing(1000001, top_size=MiB),
    "raw-odd-last-sector-data": b_raw_backing(1000001, [(999990, b"a" * 11)], MiB),
    "raw-aligned-data-holes": b_raw_backing(MiB, [(0, b"a" * 4096), (300000, b"b" * 70000)]),
    "raw-odd-data-holes": b_raw_backing(777777, [(5, b"c" * 100000), (600000, b"d" * 9)],
                                        2 * MiB),
    "raw-longer-than-top": b_raw_backing(3 * MiB + 7, [(MiB, b"e" * 8192)], MiB),
    "raw-top-odd": b_raw_top(1000001, [(4096, b"f" * 8192), (999424, b"g" * 577)]),
    "raw-top-sparse": b_raw_top(4 * MiB, [(MiB, b"abc")]),
    "backing-shorter": b_backing_shorter,
    "backing-longer": b_backing_longer,
    "prealloc-metadata": b_prealloc("metadata"),
    "prealloc-falloc": b_prealloc("falloc"),
    "prealloc-full": b_prealloc("full"),
    "prealloc-metadata-extl2": b_prealloc("metadata", "extended_l2=on"),
    "prealloc-backing": b_prealloc_backing,
    "prealloc-512": b_prealloc_small_clusters,
    "prealloc-extl2-backed": b_prealloc_extl2_backed,
    **{f"extl2-{cs // KiB}k": b_extl2(cs) for cs in (32 * KiB, 64 * KiB, 2 * MiB)},
    "extl2-64k-backed": b_extl2(64 * KiB, backed=True),
    "snapshot": b_snapshot,
    "bitmaps": b_bitmaps,
    "qed": b_qed(),
    "qed-over-qed": b_qed("qed"),
    "qed-over-raw": b_qed("raw"),
    "qcow2-over-qed": b_qcow2_over_qed,
    "pulled-to-base": b_pulled_to_base,
    "pulled-whole": b_pulled_whole,
    **{f"relhelp-{v}": b_relhelp(v, False) for v in relhelp.VARIANTS},
    **{f"relhelp-{v}-pulled": b_relhelp(v, True) for v, var in relhelp.VARIANTS.items()
       if var.base},
    # every shape test_check_repair builds, but the encrypted one (blockpull refuses those)
    **{f"repair-{n[2:]}": b_check_repair(n) for n in dir(test_check_repair)
       if n.startswith("s_") and "luks" not in n},
}


def _ours(args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["map", *args])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_map_equals_qemu_img_map(shape, tmp_path, qemu, monkeypatch):
    monkeypatch.chdir(tmp_path)
    top, opts = SHAPES[shape](qemu)
    want = qemu.img("map", "--output=json", *opts, top).stdout
    rc, got, err = _ours(["--output", "json", *opts, top])
    assert rc == 0, err
    assert json.loads(got) == json.loads(want)
    theirs = qemu.img("map", *opts, top, check=False)
    rc, got, err = _ours([*opts, top])
    assert (rc, got) == (theirs.returncode, theirs.stdout), err


# ---- the reported cases, with the values qemu-img gives ---------------------------------


def _both_json(qemu, *args):
    want = json.loads(qemu.img("map", "--output=json", *args).stdout)
    rc, got, err = _ours(["--output", "json", *args])
    assert rc == 0, err
    return json.loads(got), want


def test_raw_backing_extents_have_offsets(tmp_path, qemu, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _raw("b.raw", 64 * KiB)
    qemu.create("t.qcow2", 64 * KiB, backing="b.raw", backing_fmt="raw")
    got, want = _both_json(qemu, "t.qcow2")
    assert got == want == [{"start": 0, "length": 65536, "depth": 1, "present": True,
                            "zero": True, "data": False, "offset": 0}]


def test_raw_backing_length_is_rounded_up_to_512(tmp_path, qemu, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _raw("b.raw", 1000001, [(1000000, b"x")])
    qemu.img("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "t.qcow2", "1M")
    got, want = _both_json(qemu, "t.qcow2")
    assert got == want
    tail = {"start": 1000001, "length": 447, "depth": 1, "present": True, "zero": True,
            "data": False, "offset": 1000001}
    assert tail in got and got[-1]["start"] == 1000448 and got[-1]["depth"] == 0
    with blockpull.open("b.raw", format="raw", readonly=True) as img:
        assert img.size == 1000448 == qemu.info("b.raw")["virtual-size"]
        assert img.read(999999, 449) == b"\0x" + bytes(447)


def test_metadata_preallocation_maps_host_holes_as_zero(tmp_path, qemu, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qemu.create("pm.qcow2", 4 * MiB, opts=["preallocation=metadata"])
    qemu.io("pm.qcow2", "write -P 1 64k 4k")
    got, want = _both_json(qemu, "pm.qcow2")
    assert got == want
    assert [(e["start"], e["length"], e["zero"], e["data"]) for e in got] == \
        [(0, 65536, True, True), (65536, 4096, False, True),
         (69632, 4 * MiB - 69632, True, True)]


def test_extended_l2_2m_cluster_with_one_sector_written(tmp_path, qemu, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qemu.create("e.qcow2", 4 * MiB, opts=["extended_l2=on", "cluster_size=2M"])
    qemu.io("e.qcow2", "write -P 1 0 512")
    got, want = _both_json(qemu, "e.qcow2")
    assert got == want
    assert (got[0]["length"], got[0]["zero"], got[1]["zero"]) == (4096, False, True)


def test_human_map_names_images_as_the_chain_does(tmp_path, qemu, monkeypatch):
    monkeypatch.chdir(tmp_path)
    b_chain_in_subdir(qemu)
    rc, got, err = _ours(["./t.qcow2"])
    assert rc == 0, err
    assert got == qemu.img("map", "./t.qcow2").stdout
    assert [line.split()[3] for line in got.splitlines()[1:]] == \
        ["./d/base.qcow2", "./d/mid.qcow2", "./t.qcow2", "./d/base.qcow2"]
    assert str(tmp_path) not in got


def test_human_map_stops_at_a_compressed_cluster_like_qemu_img(tmp_path, qemu, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qemu.create("c.qcow2", MiB)
    qemu.io("c.qcow2", "write -P 1 0 64k", "write -c -P 2 64k 64k", "write -P 3 128k 64k")
    theirs = qemu.img("map", "c.qcow2", check=False)
    rc, got, err = _ours(["c.qcow2"])
    assert (rc, got) == (theirs.returncode, theirs.stdout) == (1, theirs.stdout)
    assert len(got.splitlines()) == 2 and "--output json" in err
