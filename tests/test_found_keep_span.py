"""Kept compressed clusters read a span at a time and packed across host cluster
boundaries (``compressed="keep"``), tried as a user would: narrow refcounts in the top,
shapes of template (QEMU's compressed writes between others, internal snapshots, a mid
layer, a base), corrupt descriptors, guest writes and copy-on-read racing the pull.
Judged by qemu-img check, compare and the L2 entries read back byte by byte
(tests/qcow2_edit.py); packing follows QEMU's docs/interop/qcow2.rst, "Compressed
Clusters Descriptor"."""
import json
import random
import threading

import pytest

import blockpull
import qcow2_edit


def _text(n, cs, seed=3):
    """``n`` clusters of text that compresses to about a third."""
    rnd = random.Random(seed)
    words = b"disk image cluster table refcount backing template overlay pull".split()
    out = bytearray()
    while len(out) < n * cs:
        out += b" ".join(rnd.choice(words) for _ in range(12)) + b" %d\n" % rnd.randrange(1 << 30)
    return bytes(out[:n * cs])


def _tiny(n, cs):
    """``n`` clusters that each compress to a few dozen bytes: many fit in a cluster."""
    out = bytearray()
    for c in range(n):
        out += (b"cluster %08d " % c) * (cs // 17) + bytes(cs % 17)
    return bytes(out)


def _template(qemu, d, data, cs, ctype="zlib"):
    raw = d / "src.raw"
    raw.write_bytes(data)
    tpl = str(d / "tpl.qcow2")
    qemu.img("convert", "-q", "-c", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size={cs}", str(raw), tpl)
    return raw, tpl


def _extents(path, n, cs):
    """{cluster: (host offset, bytes its sectors span from there)} of the compressed
    clusters among the first ``n`` of ``path``."""
    cb = cs.bit_length() - 1
    x = 62 - (cb - 8)
    out = {}
    for c in range(n):
        e = qcow2_edit.l2_entry(path, c * cs)
        if e >> 62 == 1:
            off = e & ((1 << x) - 1)
            nsect = (e >> x) & ((1 << (cb - 8)) - 1)
            out[c] = (off, (off & ~511) + (nsect + 1) * 512 - off)
    return out


@pytest.mark.parametrize("bits,data", [(1, "text"), (2, "text"), (4, "tiny")])
def test_keep_into_narrow_refcounts(tmp_path, qemu, bits, data):
    """A top whose refcounts are 1, 2 or 4 bits wide (``refcount_bits``): a host cluster
    counts at most 1, 3 or 15 compressed clusters. The packer starts a new cluster when
    the one it packs into counts all it can (as QEMU's qcow2_alloc_bytes does), and with
    1-bit counts packs nothing at all; the pull completes and keeps every cluster."""
    cs, n = 4096, 120
    body = _text(n, cs) if data == "text" else _tiny(n, cs)
    raw, tpl = _template(qemu, tmp_path, body, cs)
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl,
                      opts=[f"cluster_size={cs}", f"refcount_bits={bits}"])
    with blockpull.open(top) as img:
        info = img.pull(compressed="keep").result(timeout=120)
    assert info.compressed == "keep" and info.kept_bytes == n * cs
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")
    assert qemu.info(top).get("backing-filename") is None
    ext = _extents(top, n, cs)
    assert len(ext) == n
    touching = {}
    for off, ln in ext.values():
        for h in range(off // cs, (off + ln - 1) // cs + 1):
            touching[h] = touching.get(h, 0) + 1
    assert max(touching.values()) <= (1 << bits) - 1
    if bits > 1:
        assert max(touching.values()) > 1        # still packed
    # later guest writes over kept clusters free their pieces
    data = bytearray(body)
    with blockpull.open(top) as img:
        for c in range(0, n, 5):
            img.write(c * cs + 9, b"\xee" * 40)
            data[c * cs + 9:c * cs + 49] = b"\xee" * 40
        img.flush()
    raw.write_bytes(bytes(data))
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")


def _snap_top(qemu, d, bits, snaps, cs=4096, n=64):
    raw, tpl = _template(qemu, d, _text(n, cs), cs)
    top = qemu.create(d / "top.qcow2", n * cs, backing=tpl,
                      opts=[f"cluster_size={cs}", f"refcount_bits={bits}"])
    for i in range(snaps):
        qemu.img("snapshot", "-c", f"s{i}", top)
    return raw, tpl, top


@pytest.mark.parametrize("bits,snaps", [(1, 1), (2, 3)])
def test_pull_refused_where_views_overflow_refcounts(tmp_path, qemu, bits, snaps):
    """A pull links each copied cluster into the image and every internal snapshot that
    lacks it: with 1 + snapshots views above what ``refcount_bits`` counts, it is refused
    up front with ImageFormatError saying what to do, nothing written (a pull used to
    fail midway leaving clusters counted once and named twice: corrupt)."""
    raw, tpl, top = _snap_top(qemu, tmp_path, bits, snaps)
    with blockpull.open(top) as img:
        with pytest.raises(blockpull.ImageFormatError, match="refcount_bits=16"):
            img.pull()
        with pytest.raises(blockpull.ImageFormatError, match="refcount_bits=16"):
            img.pull(compressed="keep")
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")
    assert qemu.info(top)["backing-filename"] == tpl


def test_copy_on_read_refused_where_views_overflow_refcounts(tmp_path, qemu):
    """Copy-on-read links like a pull: a read that would overflow the refcounts fails
    with ImageFormatError before any view names the copy (no corruption; the copy's
    clusters may leak), and reads without copy-on-read still give the chain's bytes."""
    cs = 4096
    raw, tpl, top = _snap_top(qemu, tmp_path, 1, 1, cs)
    body = raw.read_bytes()
    with blockpull.open(top, copy_on_read=True) as img:
        with pytest.raises(blockpull.ImageFormatError, match="refcount_bits=16"):
            img.read(5 * cs, cs)
    r = qemu.img("check", "--output=json", top, check=False)
    assert json.loads(r.stdout).get("corruptions", 0) == 0
    with blockpull.open(top) as img:
        assert img.read(5 * cs, 2 * cs) == body[5 * cs:7 * cs]
    assert qemu.compare(top, str(raw), None, "raw")


def test_pull_into_snapshots_within_refcount_width(tmp_path, qemu):
    """2-bit refcounts count 3: a top with two internal snapshots (three views) is pulled,
    every view reading the chain's bytes afterwards, the image clean."""
    raw, tpl, top = _snap_top(qemu, tmp_path, 2, 2)
    with blockpull.open(top) as img:
        img.pull().result(timeout=60)
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")
    assert qemu.info(top).get("backing-filename") is None
    for s in ("s0", "s1"):
        out = tmp_path / f"{s}.raw"
        qemu.img("convert", "-l", f"snapshot.name={s}", "-O", "raw", top, str(out))
        assert out.read_bytes() == raw.read_bytes()
