"""The QED table cache: lookups (reads, maps) never write or sync, even when dirty tables
fill the cache; judged by the fault layer's record and by qemu-img."""
import blockpull
from blockpull import faults
from blockpull._driver import DATA
from blockpull._fileio import File
from blockpull._qed import Qed

CS = 4096
SPAN = CS * (4 * CS // 8)      # virtual bytes one L2 table maps (4-cluster tables): 8 MiB
RANGES = 24
TABLE = 4 * CS


def test_reads_over_dirty_tables_never_sync(tmp_path, qemu):
    path = str(tmp_path / "img.qed")
    size = RANGES * SPAN
    qemu.img("create", "-q", "-f", "qed", "-o", f"cluster_size={CS},table_size=4", path,
             str(size))
    model = bytearray(size)
    f = File(path, True, "top")
    drv = Qed(f, True, l2_cache_bytes=8 * TABLE)     # 8 tables: far fewer than 24
    try:
        for r in range(RANGES):                      # one cluster in every L2 range
            data = bytes([r + 1]) * CS
            drv.write(r * SPAN, data, None)
            model[r * SPAN:r * SPAN + CS] = data
        drv.flush()
        for r in range(8):                           # the cache is now full of dirty tables
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
        f.faults = None
        assert [o for o in inj.ops() if o.op in ("sync", "write")] == []
        for r in range(RANGES):                      # writes over a full cache still work
            data = bytes([r + 50]) * CS
            drv.write(r * SPAN + 2 * CS, data, None)
            model[r * SPAN + 2 * CS:r * SPAN + 3 * CS] = data
        drv.flush()
    finally:
        f.close()
    want = {r * SPAN // CS for r in range(RANGES)} | {r * SPAN // CS + 1 for r in range(8)}
    assert seen == want
    r = qemu.img("check", "-f", "qed", path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "model.raw").write_bytes(model)
    qemu.img("compare", "-f", "qed", "-F", "raw", path, str(tmp_path / "model.raw"))
    with blockpull.open(path, readonly=True) as img:
        assert img.read(0, size) == bytes(model)
