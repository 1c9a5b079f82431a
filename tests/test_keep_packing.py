"""How a pull that keeps compressed clusters lays their bytes out in the top: back to
back, going on across host cluster boundaries as QEMU packs them, with every host cluster
counted once per compressed cluster touching it (QEMU's docs/interop/qcow2.rst,
"Compressed Clusters Descriptor"); judged by qemu-img check, compare and the file's size,
and by reading the descriptors back byte by byte (tests/qcow2_edit.py)."""
import random

import pytest

import blockpull
import qcow2_edit
from compdata import text_clusters


_text = text_clusters


def _descriptors(path, n, cs):
    """(host offset, bytes touched) of each compressed cluster of ``path`` among its first
    ``n``: the extent the L2 entry names, sector granular."""
    cb = cs.bit_length() - 1
    x = 62 - (cb - 8)
    out = []
    for c in range(n):
        e = qcow2_edit.l2_entry(path, c * cs)
        assert e >> 62 == 1, "cluster %d is not compressed" % c
        off = e & ((1 << x) - 1)
        nsect = (e >> x) & ((1 << (cb - 8)) - 1)
        out.append((off, (off & ~511) + (nsect + 1) * 512 - off))
    return out


@pytest.mark.parametrize("cs,n", [(4096, 600), (65536, 96)], ids=["4k", "64k"])
def test_kept_bytes_go_on_across_clusters(tmp_path, qemu, cs, n):
    raw = tmp_path / "src.raw"
    raw.write_bytes(_text(n, cs))
    tpl = str(tmp_path / "tpl.qcow2")
    qemu.img("convert", "-q", "-c", "-O", "qcow2", "-o", f"cluster_size={cs}", str(raw), tpl)
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl, opts=[f"cluster_size={cs}"])
    with blockpull.open(top) as img:
        info = img.pull(compressed="keep").result(timeout=120)
    assert info.compressed == "keep" and info.kept_bytes == n * cs
    qemu.assert_clean(top)                 # refcounts exactly as the descriptors need
    assert qemu.compare(top, str(raw), None, "raw")
    ext = _descriptors(top, n, cs)
    # back to back in virtual order: each cluster's bytes start where the previous
    # cluster's sectors end or inside its last sector, never a cluster's tail apart
    for (a, alen), (b, _l) in zip(ext, ext[1:]):
        assert a < b <= a + alen, (a, alen, b)
    straddling = sum(1 for off, ln in ext if off // cs != (off + ln - 1) // cs)
    assert straddling >= n // 8
    # the top holds about what the template holds: no cluster tail left empty per
    # compressed cluster (the template was packed by QEMU the same way). A descriptor
    # names whole sectors, so each kept cluster carries up to 511 bytes past its own
    # (the next one's head): that, and the top's own tables, is all it may add.
    data_span = ext[-1][0] + ext[-1][1] - ext[0][0]
    assert data_span <= sum(ln for _o, ln in ext)
    grown = qemu.info(top)["actual-size"] - qemu.info(tpl)["actual-size"]
    assert grown <= n * 511 + 8 * cs


def test_kept_bytes_between_data_clusters(tmp_path, qemu):
    """Compressed clusters between ones QEMU left uncompressed (random data): the data
    clusters a chunk allocates come between kept bytes, so packing starts a new cluster
    where the next one is not adjacent; every cluster still counted right."""
    cs, n = 4096, 300
    rnd = random.Random(5)
    text = _text(n, cs)
    data = bytearray()
    for c in range(n):
        data += rnd.randbytes(cs) if c % 3 == 1 else text[c * cs:(c + 1) * cs]
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(data))
    tpl = str(tmp_path / "tpl.qcow2")
    qemu.img("convert", "-q", "-c", "-O", "qcow2", "-o", f"cluster_size={cs}", str(raw), tpl)
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl, opts=[f"cluster_size={cs}"])
    with blockpull.open(top) as img:
        info = img.pull(compressed="keep", chunk=64 * cs).result(timeout=120)
    assert info.kept_bytes == (n - n // 3) * cs
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")
    # later guest writes over kept clusters copy-on-write them and free what they held
    with blockpull.open(top) as img:
        for c in range(0, n, 7):
            img.write(c * cs + 100, b"\xee" * 300)
        img.flush()
    for c in range(0, n, 7):
        data[c * cs + 100:c * cs + 400] = b"\xee" * 300
    raw.write_bytes(bytes(data))
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")


@pytest.mark.parametrize("policy", ["report", "ignore"])
def test_failed_read_of_kept_bytes(tmp_path, qemu, policy):
    """A read of kept compressed bytes fails on the pull's readers (EIO): the job fails
    under its policy naming the read, nothing half-read is linked, and a later pull
    completes to the chain's bytes."""
    import errno
    from blockpull import faults
    cs, n = 65536, 64
    raw = tmp_path / "src.raw"
    raw.write_bytes(_text(n, cs))
    tpl = str(tmp_path / "tpl.qcow2")
    qemu.img("convert", "-q", "-c", "-O", "qcow2", str(raw), tpl)
    top = qemu.create(tmp_path / "top.qcow2", n * cs, backing=tpl)
    inj = faults.FaultInjector(record_writes=False)
    rule = inj.fail("read", "backing", errno.EIO, nth=2,
                    match=lambda *a: __import__("threading").current_thread().name
                    .startswith("blockpull-pull-read"))
    with blockpull.open(top) as img:
        for f in faults.files_of(img):
            if f.role == "backing":
                f.faults = inj
        job = img.pull(compressed="keep", chunk=16 * cs, on_error=policy)
        with pytest.raises(blockpull.PullError) as ei:
            job.result(timeout=60)
        assert ei.value.errno == errno.EIO and ei.value.operation == "read"
        assert rule.fired == 1
        faults.detach(img)
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")
    with blockpull.open(top) as img:
        info = img.pull(compressed="keep").result(timeout=60)
    assert 0 < info.kept_bytes <= n * cs
    import json
    chk = json.loads(qemu.img("check", "--output=json", top).stdout)
    assert chk["compressed-clusters"] == n      # all kept, over both pulls
    qemu.assert_clean(top)
    assert qemu.compare(top, str(raw), None, "raw")
    assert qemu.info(top).get("backing-filename") is None
