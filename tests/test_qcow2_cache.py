"""The qcow2 table cache: lookups (reads, maps) never write or sync, even when dirty
tables fill the cache; judged by the fault layer's record and by qemu-img."""
import blockpull
from blockpull import faults
from blockpull._driver import DATA
from blockpull._fileio import File
from blockpull._qcow2 import Qcow2

CS = 512
SPAN = CS * (CS // 8)          # virtual bytes one L2 table maps (32 KiB)
RANGES = 64


def _data_clusters_qemu(qemu, path):
    out = set()
    for e in qemu.map(path):
        if e["data"]:
            out.update(range(e["start"] // CS, (e["start"] + e["length"]) // CS))
    return out


def test_reads_over_dirty_tables_never_sync(tmp_path, qemu):
    path = str(tmp_path / "img.qcow2")
    size = RANGES * SPAN
    qemu.create(path, size, opts=[f"cluster_size={CS}"])
    model = bytearray(size)
    f = File(path, True, "top")
    drv = Qcow2(f, True, l2_cache_bytes=16 * CS)     # 16 tables: far fewer than 64
    try:
        for r in range(RANGES):                      # one cluster in every L2 range
            data = bytes([r + 1]) * CS
            drv.write(r * SPAN, data, None)
            model[r * SPAN:r * SPAN + CS] = data
        drv.flush()
        for r in range(16):                          # the cache is now full of dirty tables
            data = bytes([r + 100]) * CS
            drv.write(r * SPAN + CS, data, None)
            model[r * SPAN + CS:r * SPAN + 2 * CS] = data
        inj = faults.FaultInjector()
        f.faults = inj
        seen = set()
        for _ in range(2):                           # a map over every L2 table, twice
            pos = 0
            while pos < size:
                kind, run, _host = drv.block_status(pos, size - pos)
                if kind == DATA:
                    seen.update(range(pos // CS, (pos + run) // CS))
                pos += run
        for r in range(RANGES):
            drv.pull_status(r * SPAN, SPAN)
            drv.refcount(r)
        f.faults = None
        assert [o for o in inj.ops() if o.op in ("sync", "write")] == []
        drv.flush()
    finally:
        f.close()
    want = {r * SPAN // CS for r in range(RANGES)} | {r * SPAN // CS + 1 for r in range(16)}
    assert seen == want
    qemu.assert_clean(path)
    assert _data_clusters_qemu(qemu, path) == want
    (tmp_path / "model.raw").write_bytes(model)
    assert qemu.compare(path, str(tmp_path / "model.raw"), "qcow2", "raw")
    with blockpull.open(path, readonly=True) as img:
        assert img.read(0, size) == bytes(model)
