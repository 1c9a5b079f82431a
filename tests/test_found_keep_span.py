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
from compdata import text_clusters


_text = text_clusters


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
    with ImageFormatError before any view names the copy, the copy's clusters given
    back (check clean: no corruption, no leak), and reads without copy-on-read still give
    the chain's bytes."""
    cs = 4096
    raw, tpl, top = _snap_top(qemu, tmp_path, 1, 1, cs)
    body = raw.read_bytes()
    with blockpull.open(top, copy_on_read=True) as img:
        with pytest.raises(blockpull.ImageFormatError, match="refcount_bits=16"):
            img.read(5 * cs, cs)
    qemu.assert_clean(top)
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


def _straddling(ext, cs):
    return [c for c, (off, ln) in sorted(ext.items()) if off // cs != (off + ln - 1) // cs]


@pytest.mark.parametrize("cs", [512, 4096])
def test_repair_on_open_counts_straddling_kept_clusters(tmp_path, qemu, cs):
    """A kept top whose refcounts went stale (lazy refcounts, dirty bit set, the counts
    of host clusters that straddling compressed clusters share knocked down to 1): the
    writable open rebuilds them from the tables, one reference per compressed cluster
    touching each host cluster, and the image is clean."""
    n = 300
    raw, tpl = _template(qemu, tmp_path, _text(n, cs), cs)
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl,
                      opts=[f"cluster_size={cs}"])
    with blockpull.open(top) as img:
        img.pull(compressed="keep").result(timeout=120)
    ext = _extents(top, n, cs)
    strad = _straddling(ext, cs)
    assert len(strad) >= 10
    h = qcow2_edit.header(top)
    qcow2_edit.set_field(top, "compatible_features", h["compatible_features"] | 1)
    qcow2_edit.set_field(top, "incompatible_features", h["incompatible_features"] | 1)
    for c in strad[:10]:
        off, ln = ext[c]
        qcow2_edit.set_refcount(top, (off + ln - 1) // cs, 1)
    assert qemu.check(top) != 0
    with blockpull.open(top):
        pass
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")


def test_guest_writes_over_straddling_kept_clusters_with_snapshot(tmp_path, qemu):
    """After a keep pull, a snapshot of the top (every host cluster counted twice), then
    guest writes over kept clusters whose bytes straddle host clusters: each write drops
    one reference from every host cluster the old bytes touch; clean before and after
    the snapshot is deleted, the snapshot still reading the pulled bytes."""
    cs, n = 4096, 300
    body = _text(n, cs)
    raw, tpl = _template(qemu, tmp_path, body, cs)
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl,
                      opts=[f"cluster_size={cs}"])
    with blockpull.open(top) as img:
        img.pull(compressed="keep").result(timeout=120)
    strad = _straddling(_extents(top, n, cs), cs)
    assert len(strad) >= 10
    qemu.img("snapshot", "-c", "s1", top)
    data = bytearray(body)
    with blockpull.open(top) as img:
        for c in strad[::2]:
            img.write(c * cs + 10, b"\xab" * 20)
            data[c * cs + 10:c * cs + 30] = b"\xab" * 20
        img.flush()
    qemu.assert_clean(top)
    after = tmp_path / "after.raw"
    after.write_bytes(bytes(data))
    assert qemu.compare(top, str(after), None, "raw")
    snap = tmp_path / "s1.raw"
    qemu.img("convert", "-l", "snapshot.name=s1", "-O", "raw", top, str(snap))
    assert snap.read_bytes() == body
    qemu.img("snapshot", "-d", "s1", top)
    qemu.assert_clean(top)
    assert qemu.compare(top, str(after), None, "raw")


@pytest.mark.parametrize("how", ["wide", "widest", "same-bytes", "reversed", "past-eof"])
def test_kept_spans_over_odd_descriptors(tmp_path, qemu, how):
    """Descriptors a span read must slice right: sector counts reaching into the next
    cluster's bytes ("wide") or past a cluster ("widest": inflated, not kept), two L2
    entries naming the same bytes, bytes in the reverse of virtual order, the last
    cluster's sectors reaching past the end of the file. The top reads what the chain
    read (qemu-img convert of the chain before the pull), clean."""
    cs, n = 4096, 64
    raw, tpl = _template(qemu, tmp_path, _text(n, cs), cs)
    x = 62 - (12 - 8)
    ents = [qcow2_edit.l2_entry(tpl, c * cs) for c in range(n)]
    assert all(e >> 62 == 1 for e in ents)

    def put(c, e):
        qcow2_edit.poke(tpl, qcow2_edit.l2_entry_pos(tpl, c * cs), ">Q", e)

    offs = [e & ((1 << x) - 1) for e in ents]
    if how in ("wide", "widest"):
        for c in range(0, n, 3):
            put(c, (1 << 62) | ((7 if how == "wide" else 15) << x) | offs[c])
    elif how == "same-bytes":
        for c in range(1, n, 4):
            put(c, ents[c - 1])
    elif how == "reversed":
        for c in range(n):
            put(c, ents[n - 1 - c])
    else:
        last = max(range(n), key=lambda c: offs[c])
        put(last, (1 << 62) | (7 << x) | offs[last])
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl,
                      opts=[f"cluster_size={cs}"])
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        info = img.pull(compressed="keep", chunk=16 * cs).result(timeout=120)
    kept = n * cs
    if how == "widest":
        # kept where the named bytes, cut at the end of the file, still fit a cluster
        size = (tmp_path / "tpl.qcow2").stat().st_size
        kept -= cs * sum(1 for c in range(0, n, 3)
                         if min(16 * 512 - offs[c] % 512, size - offs[c]) > cs)
        assert kept < n * cs
    assert info.kept_bytes == kept
    qemu.assert_clean(top)
    assert qemu.compare(top, str(want), None, "raw")
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, n * cs) == want.read_bytes()


@pytest.mark.parametrize("cs", [512, 4096])
def test_keep_with_guest_writes_and_copy_on_read_racing(tmp_path, qemu, cs):
    """Guest writes (small, into clusters kept compressed in the template) and
    copy-on-read reads on other threads while a keep pull runs through a mid layer
    mixing data, zeros and compressed clusters, paused and resumed midway: every read
    gives the bytes written so far, and the top ends clean, reading the chain plus the
    writes."""
    n = 300
    raw, tpl = _template(qemu, tmp_path, _text(n, cs, seed=9), cs)
    mid = qemu.create(tmp_path / "mid.qcow2", n * cs, backing=tpl, opts=[f"cluster_size={cs}"])
    qemu.io(mid, f"write -P 0x5a {2 * cs} {cs}", f"write -z {4 * cs} {2 * cs}",
            f"write -c -P 0x33 {7 * cs} {cs}", f"write -P 0x11 {9 * cs + 100} 300")
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=mid, opts=[f"cluster_size={cs}"])
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    data = bytearray(want.read_bytes())
    lock = threading.Lock()
    stop = threading.Event()
    bad = []

    def writer(seed):
        rnd = random.Random(seed)
        while not stop.is_set():
            o = rnd.randrange(n) * cs + rnd.randrange(cs - 40)
            b = bytes([rnd.randrange(256)]) * rnd.randrange(1, 40)
            with lock:
                img.write(o, b)
                data[o:o + len(b)] = b

    def reader(seed):
        rnd = random.Random(seed)
        while not stop.is_set():
            c = rnd.randrange(n)
            with lock:
                if img.read(c * cs, cs) != bytes(data[c * cs:(c + 1) * cs]):
                    bad.append(c)

    with blockpull.open(top, copy_on_read=True) as img:
        threads = [threading.Thread(target=writer, args=(1,)),
                   threading.Thread(target=reader, args=(2,)),
                   threading.Thread(target=reader, args=(3,))]
        for t in threads:
            t.start()
        try:
            job = img.pull(compressed="keep", chunk=8 * cs)
            job.pause()
            job.resume()
            info = job.result(timeout=120)
        finally:
            stop.set()
            for t in threads:
                t.join()
        img.flush()
    assert not bad
    assert info.compressed == "keep"
    qemu.assert_clean(top)
    after = tmp_path / "after.raw"
    after.write_bytes(bytes(data))
    assert qemu.compare(top, str(after), None, "raw")
    assert qemu.info(top).get("backing-filename") is None


def test_copy_on_read_extended_l2_snapshots_never_wraps_refcounts(tmp_path, qemu):
    """An extended-L2 top with 2-bit refcounts (at most 3) and three internal snapshots:
    a copy-on-read link would count a cluster in four views. It is refused with
    ImageFormatError before any view changes (the count used to be stored wrapped to 0:
    qemu-img check found the image corrupt), and a pull is refused up front."""
    cs, n = 65536, 8
    raw, tpl = _template(qemu, tmp_path, _text(n, cs), cs)
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl,
                      opts=[f"cluster_size={cs}", "refcount_bits=2", "extended_l2=on"])
    for i in range(3):
        qemu.img("snapshot", "-c", f"s{i}", top)
    with blockpull.open(top, copy_on_read=True) as img:
        with pytest.raises(blockpull.ImageFormatError, match="refcount_bits=16"):
            img.read(0, cs)
    r = qemu.img("check", "--output=json", top, check=False)
    assert json.loads(r.stdout).get("corruptions", 0) == 0
    with blockpull.open(top) as img:
        with pytest.raises(blockpull.ImageFormatError, match="refcount_bits=16"):
            img.pull()
    assert qemu.compare(top, str(raw), None, "raw")
