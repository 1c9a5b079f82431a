"""Pulls that keep compressed clusters compressed (``compressed="keep"``), judged by
qemu-img compare, check, info and map."""
import os
import random
import subprocess
import sys

import pytest

import blockpull
from blockpull._q2compress import Decompressor


def _raw_data(n, cs, seed=7):
    """``n`` clusters of mixed compressibility: random (QEMU stores them uncompressed),
    text, a four-letter alphabet, and zeros (left out of the template)."""
    rnd = random.Random(seed)
    out = bytearray()
    for i in range(n):
        k = i % 5
        if k == 0:
            out += rnd.randbytes(cs)
        elif k == 1:
            out += bytes(cs)
        elif k in (2, 4):
            line = b"cluster %d of the template, line after line " % i
            out += (line * (cs // len(line) + 1))[:cs]
        else:
            out += bytes(rnd.choice(b"acgt") for _ in range(cs))
    return bytes(out)


def _chain(qemu, d, cs, ctype, n, mid=True, top_opts=()):
    """template (``qemu-img convert -c``, compression ``ctype``), an optional mid layer
    with plain and zero writes, and an empty top of the same cluster size. Returns
    (top, raw file of what the chain reads)."""
    raw = d / "src.raw"
    raw.write_bytes(_raw_data(n, cs))
    tpl = str(d / "tpl.qcow2")
    qemu.img("convert", "-q", "-c", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size={cs}", str(raw), tpl)
    below = tpl
    if mid:
        below = qemu.create(d / "mid.qcow2", n * cs, backing=tpl,
                            opts=[f"cluster_size={cs}"])
        qemu.io(below, f"write -P 0x5a {2 * cs} {cs}", f"write -z {3 * cs} {cs}",
                f"write -P 0x11 {7 * cs + 512} 1024")
    top = qemu.create(d / "top.qcow2", n * cs, backing=below,
                      opts=[f"cluster_size={cs}", *top_opts])
    want = d / "want.raw"
    qemu.to_raw(top, want)
    return top, want


def _compressed_entries(qemu, path):
    """How many clusters of ``path`` qemu-img check counts as compressed."""
    import json
    r = qemu.img("check", "--output=json", str(path), check=False)
    return json.loads(r.stdout).get("compressed-clusters", 0)


def _used(path):
    """Bytes the file takes on disk."""
    return os.stat(path).st_blocks * 512


def _pull(top, compressed, **kw):
    with blockpull.open(top) as img:
        info = img.pull(compressed=compressed, **kw).result(timeout=120)
    return info


SHAPES = [(4096, 160), (65536, 40), (2 << 20, 10)]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
@pytest.mark.parametrize("cs,n", SHAPES, ids=["4k", "64k", "2m"])
def test_keep_equals_chain(tmp_path, qemu, ctype, cs, n):
    top, want = _chain(qemu, tmp_path, cs, ctype, n)
    inflated = qemu.create(tmp_path / "inflated.qcow2", n * cs,
                           backing=str(tmp_path / "mid.qcow2"), opts=[f"cluster_size={cs}"])
    info = _pull(top, "keep")
    assert info.compressed == "keep", info.compressed_reason
    assert info.kept_bytes > 0
    assert info.cur == info.end
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")
    qi = qemu.info(top)
    assert qi.get("backing-filename") is None
    assert qi["format-specific"]["data"]["compression-type"] == ctype
    # the mid layer replaced two of the template's compressed clusters and wrote a
    # third in part: every other compressed cluster of the template is kept
    kept = _compressed_entries(qemu, top)
    assert 0 < kept <= _compressed_entries(qemu, tmp_path / "tpl.qcow2") - 3
    assert info.kept_bytes == kept * cs
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, img.size) == want.read_bytes()
    # the same pull inflating: keep is well under its size, about the template's
    assert _pull(str(inflated), "inflate").compressed == "inflate"
    assert qemu.compare(str(inflated), top)
    kept_size, inflated_size = _used(top), _used(inflated)
    # what keeping saved is most of what it kept (metadata is the same in both)
    assert inflated_size - kept_size > 0.6 * info.kept_bytes
    assert kept_size < _used(tmp_path / "tpl.qcow2") + _used(tmp_path / "mid.qcow2") + 8 * cs


def test_map_agrees(tmp_path, qemu):
    """qemu-img map and Image.map agree on the kept clusters: data, no offset."""
    top, want = _chain(qemu, tmp_path, 65536, "zlib", 20)
    _pull(top, "keep")
    qm = qemu.map(top)
    with blockpull.open(top, readonly=True) as img:
        ours = img.map()
    assert [(e["start"], e["length"], e["data"], e["zero"], e.get("offset")) for e in qm] == \
        [(e.start, e.length, e.data, e.zero, e.offset) for e in ours]
    assert any(e["data"] and "offset" not in e for e in qm)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_guest_writes_after_keep(tmp_path, qemu, ctype):
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, ctype, 30)
    _pull(top, "keep")
    data = bytearray(want.read_bytes())
    # cluster 4 and 9 (text) are kept compressed: partial writes copy them on write
    with blockpull.open(top) as img:
        img.write(4 * cs + 100, b"\xee" * 3000)
        img.write(9 * cs - 10, b"\xdd" * 20)       # across a cluster boundary
        img.write_zeroes(14 * cs, cs)
        img.flush()
    data[4 * cs + 100:4 * cs + 3100] = b"\xee" * 3000
    data[9 * cs - 10:9 * cs + 10] = b"\xdd" * 20
    data[14 * cs:15 * cs] = bytes(cs)
    qemu.io(top, f"write -P 0x77 {19 * cs + 4096} 8192")
    data[19 * cs + 4096:19 * cs + 4096 + 8192] = b"\x77" * 8192
    (tmp_path / "after.raw").write_bytes(bytes(data))
    qemu.assert_clean(top)
    assert qemu.compare(top, str(tmp_path / "after.raw"), None, "raw")
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, img.size) == bytes(data)


def test_guest_writes_during_keep(tmp_path, qemu):
    """Guest writes racing the pull (small chunks, one read in flight at a time)."""
    cs = 4096
    top, want = _chain(qemu, tmp_path, cs, "zlib", 200)
    data = bytearray(want.read_bytes())
    with blockpull.open(top) as img:
        job = img.pull(compressed="keep", chunk=4 * cs, bandwidth=64 * cs)
        for k in range(0, 200, 13):
            img.write(k * cs + 7, b"\x42" * 9)
            data[k * cs + 7:k * cs + 16] = b"\x42" * 9
        job.set_speed(0)
        info = job.result(timeout=120)
        assert info.compressed == "keep"
    (tmp_path / "after.raw").write_bytes(bytes(data))
    qemu.assert_clean(top)
    assert qemu.compare(top, str(tmp_path / "after.raw"), None, "raw")


def test_top_holding_zlib_over_zstd_inflates(tmp_path, qemu):
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zstd", 20, mid=False)
    qemu.io(top, f"write -c -P 0x33 {5 * cs} {cs}")      # a zlib cluster in the top
    data = bytearray(want.read_bytes())
    data[5 * cs:6 * cs] = b"\x33" * cs
    info = _pull(top, "keep")
    assert info.compressed == "inflate"
    assert "zlib" in info.compressed_reason and "zstd" in info.compressed_reason
    assert info.kept_bytes == 0
    (tmp_path / "after.raw").write_bytes(bytes(data))
    qemu.assert_clean(top)
    assert qemu.compare(top, str(tmp_path / "after.raw"), None, "raw")
    assert qemu.info(top)["format-specific"]["data"]["compression-type"] == "zlib"
    assert _compressed_entries(qemu, top) == 1


def test_top_zlib_clusters_zlib_backing_keeps(tmp_path, qemu):
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zlib", 20, mid=False)
    qemu.io(top, f"write -c -P 0x33 {5 * cs} {cs}")
    data = bytearray(want.read_bytes())
    data[5 * cs:6 * cs] = b"\x33" * cs
    info = _pull(top, "keep")
    assert info.compressed == "keep" and info.kept_bytes > 0
    (tmp_path / "after.raw").write_bytes(bytes(data))
    qemu.assert_clean(top)
    assert qemu.compare(top, str(tmp_path / "after.raw"), None, "raw")


def test_other_cluster_size_inflates(tmp_path, qemu):
    cs = 65536
    _chain(qemu, tmp_path, cs, "zlib", 10, mid=False)
    top = qemu.create(tmp_path / "top2.qcow2", 10 * cs, backing=str(tmp_path / "tpl.qcow2"),
                      opts=["cluster_size=4096"])
    info = _pull(top, "keep")
    assert info.compressed == "inflate"
    assert "cluster size" in info.compressed_reason
    qemu.assert_clean(top)
    assert qemu.compare(top, str(tmp_path / "src.raw"), None, "raw")


def test_qed_top_inflates(tmp_path, qemu):
    cs = 65536
    _chain(qemu, tmp_path, cs, "zlib", 10, mid=False)
    top = qemu.create(tmp_path / "top.qed", 10 * cs, fmt="qed",
                      backing=str(tmp_path / "tpl.qcow2"))
    info = _pull(top, "keep")
    assert info.compressed == "inflate" and "qed" in info.compressed_reason
    qemu.assert_clean(top, "qed")
    assert qemu.compare(top, str(tmp_path / "src.raw"), "qed", "raw")


def test_top_with_a_data_file_inflates(tmp_path, qemu):
    cs = 65536
    _chain(qemu, tmp_path, cs, "zlib", 10, mid=False)
    top = qemu.create(tmp_path / "top.qcow2", 10 * cs, backing=str(tmp_path / "tpl.qcow2"),
                      opts=[f"data_file={tmp_path / 'top.data'}"])
    info = _pull(top, "keep")
    assert info.compressed == "inflate" and "data file" in info.compressed_reason
    assert info.kept_bytes == 0
    qemu.assert_clean(top)
    assert qemu.compare(top, str(tmp_path / "src.raw"), None, "raw")


def test_default_inflates_and_bad_value(tmp_path, qemu):
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zlib", 10, mid=False)
    with blockpull.open(top) as img:
        with pytest.raises(ValueError, match="inflate.*keep"):
            img.pull(compressed="yes")
        info = img.pull().result(timeout=60)
    assert info.compressed == "inflate" and info.kept_bytes == 0
    assert _compressed_entries(qemu, top) == 0
    assert qemu.compare(top, want, None, "raw")


def test_keep_with_base(tmp_path, qemu):
    """Down to a kept base (the mid layer): the template lies below it, nothing
    compressed is pulled."""
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zlib", 10)
    qemu.io(top, "write -P 0x66 0 4096")
    data = bytearray(want.read_bytes())
    data[:4096] = b"\x66" * 4096
    want.write_bytes(bytes(data))
    info = _pull(top, "keep", base=str(tmp_path / "mid.qcow2"))
    assert info.compressed == "inflate" and "no backing image" in info.compressed_reason
    assert info.kept_bytes == 0
    assert _compressed_entries(qemu, top) == 0
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")


def test_kept_bytes_decode_in_the_top(tmp_path, qemu):
    """Each kept cluster's bytes, read back through the top's own descriptor, inflate
    to the cluster the template holds."""
    cs = 4096
    top, want = _chain(qemu, tmp_path, cs, "zstd", 40, mid=False)
    _pull(top, "keep")
    raw = want.read_bytes()
    with blockpull.open(top, readonly=True) as img:
        for c in range(40):
            assert img.read(c * cs, cs) == raw[c * cs:(c + 1) * cs]
    assert Decompressor(cs, 1, "x").cluster_size == cs


def test_cli_keep_compressed(tmp_path, qemu):
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zstd", 20, mid=False)
    r = subprocess.run([sys.executable, "-m", "blockpull", "pull", "--keep-compressed",
                        "--no-progress", top], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert "kept compressed" in r.stdout
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")
    assert qemu.info(top)["format-specific"]["data"]["compression-type"] == "zstd"
    assert _compressed_entries(qemu, top) > 0


def test_cli_pull_many_keep(tmp_path, qemu):
    cs = 65536
    d1, d2 = tmp_path / "a", tmp_path / "b"
    d1.mkdir()
    d2.mkdir()
    t1, w1 = _chain(qemu, d1, cs, "zlib", 10, mid=False)
    t2, w2 = _chain(qemu, d2, cs, "zstd", 10, mid=False)
    r = subprocess.run([sys.executable, "-m", "blockpull", "pull", "--keep-compressed",
                        "--no-progress", t1, t2], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    for t, w in ((t1, w1), (t2, w2)):
        qemu.assert_clean(t)
        assert qemu.compare(t, w, None, "raw")
        assert _compressed_entries(qemu, t) > 0


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_check_agrees_with_qemu(tmp_path, qemu, ctype):
    """blockpull.check counts a kept image as qemu-img check does (packed host clusters,
    one reference per compressed cluster in each)."""
    import json
    cs = 4096
    top, want = _chain(qemu, tmp_path, cs, ctype, 120)
    _pull(top, "keep")
    q = json.loads(qemu.img("check", "--output=json", top, check=False).stdout)
    r = blockpull.check(top)
    assert (r.corruptions, r.leaks) == (0, 0), r.messages
    assert r.compressed_clusters == q["compressed-clusters"] > 0
    assert r.allocated_clusters == q["allocated-clusters"]
    assert r.fragmented_clusters == q["fragmented-clusters"]
    assert r.image_end_offset == q["image-end-offset"]


def test_v2_top_keeps_zlib(tmp_path, qemu):
    """qcow2 v2 holds compressed clusters too (zlib, the only type it can name)."""
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zlib", 20, top_opts=["compat=0.10"])
    info = _pull(top, "keep")
    assert info.compressed == "keep" and info.kept_bytes > 0
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")
    assert qemu.info(top)["format-specific"]["data"]["compat"] == "0.10"


def test_v2_top_zstd_backing_inflates(tmp_path, qemu):
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zstd", 20, mid=False, top_opts=["compat=0.10"])
    info = _pull(top, "keep")
    assert info.compressed == "inflate" and "112-byte header" in info.compressed_reason
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")
    assert _compressed_entries(qemu, top) == 0


def test_abort_then_copy_on_read_then_pull_again(tmp_path, qemu):
    """An aborted keep pull leaves a valid, still backed image; copy-on-read fills the
    rest (inflated), and a second keep pull finds nothing left to copy."""
    import time
    cs = 4096
    top, want = _chain(qemu, tmp_path, cs, "zstd", 200)
    with blockpull.open(top) as img:
        job = img.pull(compressed="keep", chunk=4 * cs, bandwidth=40 * cs)
        while job.info().kept_bytes == 0 and not job.done():
            time.sleep(0.01)
        job.abort()
        assert job.status == "cancelled" and job.info().kept_bytes > 0
    qemu.assert_clean(top)
    assert qemu.info(top).get("backing-filename")
    assert qemu.compare(top, want, None, "raw")
    with blockpull.open(top, copy_on_read=True) as img:
        assert img.read(0, img.size) == want.read_bytes()
    qemu.assert_clean(top)
    info = _pull(top, "keep")
    assert info.copied_bytes == 0
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")
    assert qemu.info(top).get("backing-filename") is None
    assert _compressed_entries(qemu, top) > 0


def test_short_last_cluster(tmp_path, qemu):
    """A disk size that ends inside a cluster: the last (compressed) cluster is kept."""
    cs = 65536
    raw = tmp_path / "src.raw"
    raw.write_bytes(_raw_data(9, cs)[:8 * cs + 1536])
    tpl = str(tmp_path / "tpl.qcow2")
    qemu.img("convert", "-q", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), tpl)
    top = qemu.create(tmp_path / "top.qcow2", 8 * cs + 1536, backing=tpl)
    info = _pull(top, "keep")
    assert info.kept_bytes % cs == 1536 and info.cur == info.end     # the last one kept
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")
    assert qemu.compare(top, tpl)


def test_failed_write_of_kept_bytes(tmp_path, qemu):
    """A write of kept compressed bytes fails (EIO) under on_error="stop": the chunk is
    given back (its packed bytes uncounted), the pull pauses, and once resumed copies it
    again; the result is equal and without leaks."""
    import errno
    import threading
    import time
    from blockpull import faults
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zlib", 40)

    def kept_write(op, role, off, n):
        return threading.current_thread().name.startswith("blockpull-write") and off % 512
    inj = faults.FaultInjector(record_writes=False)
    with blockpull.open(top) as img:
        faults.attach(img, inj)
        rule = inj.fail("write", "top", errno.EIO, nth=2, times=1, match=kept_write)
        job = img.pull(compressed="keep", on_error="stop", chunk=4 * cs)
        t0 = time.monotonic()
        while job.status != "paused":
            assert not job.done(), job.error
            assert time.monotonic() - t0 < 60
            time.sleep(0.005)
        assert rule.fired == 1
        job.resume()
        info = job.result(timeout=60)
        faults.detach(img)
    assert info.kept_bytes > 0
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")


def test_top_with_snapshots_inflates(tmp_path, qemu):
    cs = 65536
    top, want = _chain(qemu, tmp_path, cs, "zlib", 10, mid=False)
    qemu.img("snapshot", "-c", "s1", top)
    info = _pull(top, "keep")
    assert info.compressed == "inflate" and "snapshots" in info.compressed_reason
    qemu.assert_clean(top)
    assert qemu.compare(top, want, None, "raw")
    assert _compressed_entries(qemu, top) == 0


def test_extended_l2_top_plans_inflate(tmp_path, qemu):
    """A top with extended L2 entries inflates (its compressed entries would need a
    bitmap of their own); the plan says so."""
    from blockpull._q2keep import plan
    cs = 65536
    _chain(qemu, tmp_path, cs, "zlib", 10, mid=False)
    top = qemu.create(tmp_path / "ext.qcow2", 10 * cs, backing=str(tmp_path / "tpl.qcow2"),
                      opts=["extended_l2=on"])
    with blockpull.open(top, readonly=True) as img:
        p = plan(img.chain_obj, img.layers[0], len(img.layers), "keep")
    assert p.mode == "inflate" and "extended L2" in p.reason


def test_oneshot_and_libvirt_shaped_keep(tmp_path, qemu):
    import threading
    cs = 65536
    d1, d2 = tmp_path / "a", tmp_path / "b"
    d1.mkdir()
    d2.mkdir()
    t1, w1 = _chain(qemu, d1, cs, "zstd", 10, mid=False)
    info = blockpull.pull(t1, compressed="keep")
    assert info.compressed == "keep" and info.kept_bytes > 0
    with pytest.raises(ValueError):
        blockpull.pull(t1, compressed="KEEP")
    t2, w2 = _chain(qemu, d2, cs, "zlib", 10, mid=False)
    done = threading.Event()
    eid = blockpull.event_register(blockpull.EVENT_ID_BLOCK_PULL,
                                   lambda path, status: done.set())
    try:
        blockpull.block_pull(t2, compressed="keep")
        assert done.wait(60)
    finally:
        blockpull.event_deregister(eid)
    for t, w in ((t1, w1), (t2, w2)):
        qemu.assert_clean(t)
        assert qemu.compare(t, w, None, "raw")
        assert _compressed_entries(qemu, t) > 0
