"""blockpull against QEMU's block-stream, qemu-img convert and cp, on the same chains.

Timed regions end when the copied bytes are durable: blockpull's own final fdatasync (and
relink), an fdatasync of the output after block-stream / convert / cp.
"""
from __future__ import annotations

import json
import mmap
import os
import statistics
import sys
import time

import pytest

from benchlib import (GiB, MiB, TiB, StorageDaemon, blockpull_pull, drop_file, fdatasync_path,
                      record, run, settle)

import blockpull
from blockpull.image import DRIVERS

ROUNDS = int(os.environ.get("BLOCKPULL_BENCH_ROUNDS", "5"))
DENSE = GiB
FORMATS = [f for f in ("qcow2", "qed") if f in DRIVERS]

MEDIANS: dict = {}


def _median(benchmark) -> float:
    return benchmark.stats.stats.median


def _rate(nbytes: int, seconds: float) -> str:
    return "%.0f MiB/s" % (nbytes / seconds / MiB)


def _verify_pulled(path: str, ref_raw: str, fmt: str) -> None:
    """The pulled image stands alone, is clean and reads what the chain read."""
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)
    assert "backing-filename" not in info, info
    run("qemu-img", "check", "-f", fmt, path)
    run("qemu-img", "compare", "-f", fmt, "-F", "raw", path, ref_raw)


def _ratio_row(name: str, key: str, peer: str) -> None:
    a, b = MEDIANS.get(key), MEDIANS.get(peer)
    if a and b:
        record(name, figure="%.2fx" % (b / a), notes=f"time of {peer} / time of {key}")


# ---- dense chain: 1 GiB of random data over three layers --------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
class TestDense:
    def test_blockpull(self, benchmark, chains, fmt):
        c = chains.get("dense", fmt, size=DENSE)
        out = {}

        def setup():
            out["p"] = c.fresh_top()
            return (out["p"],), {}
        benchmark.pedantic(blockpull_pull, setup=setup, rounds=ROUNDS, iterations=1)
        _verify_pulled(out["p"], c.ref_raw, fmt)
        t = MEDIANS[f"dense-{fmt}-blockpull"] = _median(benchmark)
        record(f"dense {fmt}: blockpull pull", figure=_rate(DENSE, t),
               notes="median of %d, %.3f s" % (ROUNDS, t))

    def test_blockstream(self, benchmark, chains, fmt):
        c = chains.get("dense", fmt, size=DENSE)
        out = {}

        def setup():
            if "d" in out:
                out.pop("d").close()
            out["p"] = c.fresh_top()
            out["d"] = StorageDaemon(out["p"], fmt)
            return (), {}

        def target():
            out["d"].stream()
            fdatasync_path(out["p"])
        try:
            benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1)
        finally:
            if "d" in out:
                out.pop("d").close()
        run("qemu-img", "compare", "-f", fmt, "-F", "raw", out["p"], c.ref_raw)
        t = MEDIANS[f"dense-{fmt}-blockstream"] = _median(benchmark)
        record(f"dense {fmt}: QEMU block-stream", figure=_rate(DENSE, t),
               notes="median of %d, %.3f s" % (ROUNDS, t))
        _ratio_row(f"dense {fmt}: blockpull / block-stream", f"dense-{fmt}-blockpull",
                   f"dense-{fmt}-blockstream")

    def test_convert(self, benchmark, chains, fmt):
        c = chains.get("dense", fmt, size=DENSE)
        dst = os.path.join(c.dir, "converted.qcow2")

        def setup():
            drop_file(dst)
            settle()
            return (), {}

        def target():
            run("qemu-img", "convert", "-f", fmt, "-O", "qcow2", c.top, dst)
            fdatasync_path(dst)
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1)
        t = MEDIANS[f"dense-{fmt}-convert"] = _median(benchmark)
        record(f"dense {fmt}: qemu-img convert -O qcow2", figure=_rate(DENSE, t),
               notes="median of %d, %.3f s" % (ROUNDS, t))
        _ratio_row(f"dense {fmt}: blockpull / convert", f"dense-{fmt}-blockpull",
                   f"dense-{fmt}-convert")
        drop_file(dst)

    def test_cp(self, benchmark, chains, fmt):
        c = chains.get("dense", fmt, size=DENSE)
        dst = os.path.join(c.dir, "copied.raw")
        with open(c.ref_raw, "rb") as f:
            while f.read(16 * MiB):
                pass

        def setup():
            drop_file(dst)
            settle()
            return (), {}

        def target():
            run("cp", c.ref_raw, dst)
            fdatasync_path(dst)
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1)
        t = MEDIANS[f"dense-{fmt}-cp"] = _median(benchmark)
        record(f"dense {fmt}: cp of the same bytes (raw)", figure=_rate(DENSE, t),
               notes="median of %d, %.3f s" % (ROUNDS, t))
        _ratio_row(f"dense {fmt}: blockpull / cp", f"dense-{fmt}-blockpull", f"dense-{fmt}-cp")
        drop_file(dst)

    def test_blockpull_polled(self, benchmark, chains, fmt):
        """The same pull while another thread polls info() at 1 kHz."""
        c = chains.get("dense", fmt, size=DENSE)
        out = {"polls": []}

        def setup():
            out["p"] = c.fresh_top()
            return (out["p"],), {}

        def target(path):
            with blockpull.open(path) as img:
                job = img.pull()
                n = 0
                nxt = time.perf_counter()
                while not job.done():
                    job.info()
                    n += 1
                    nxt += 0.001
                    d = nxt - time.perf_counter()
                    if d > 0:
                        time.sleep(d)
                out["polls"].append(n)
                return job.result()
        benchmark.pedantic(target, setup=setup, rounds=ROUNDS, iterations=1)
        t = MEDIANS[f"dense-{fmt}-polled"] = _median(benchmark)
        base = MEDIANS.get(f"dense-{fmt}-blockpull")
        cost = "" if not base else ", throughput cost %+.1f%%" % ((t / base - 1) * 100)
        record(f"dense {fmt}: blockpull, info() at 1 kHz", figure=_rate(DENSE, t),
               notes="median of %d, %d polls per run%s" % (
                   ROUNDS, statistics.median(out["polls"]), cost))


# ---- sparse chain: 1 TiB virtual, 64 MiB of data ---------------------------------------

SPARSE_ROUNDS = max(3, ROUNDS // 2 + 1)


class TestSparse:
    def test_blockpull(self, benchmark, chains):
        c = chains.get("sparse", "qcow2", size=TiB, data=64 * MiB)

        def setup():
            return (c.fresh_top(),), {}
        res = benchmark.pedantic(blockpull_pull, setup=setup, rounds=SPARSE_ROUNDS, iterations=1)
        assert res.copied_bytes == 64 * MiB
        t = MEDIANS["sparse-blockpull"] = _median(benchmark)
        record("sparse 1 TiB/64 MiB: blockpull pull", figure="%.3f s" % t,
               notes="median of %d" % SPARSE_ROUNDS)

    def test_blockstream(self, benchmark, chains):
        c = chains.get("sparse", "qcow2", size=TiB, data=64 * MiB)
        out = {}

        def setup():
            if "d" in out:
                out.pop("d").close()
            out["p"] = c.fresh_top()
            out["d"] = StorageDaemon(out["p"], "qcow2")
            return (), {}

        def target():
            out["d"].stream()
            fdatasync_path(out["p"])
        try:
            benchmark.pedantic(target, setup=setup, rounds=SPARSE_ROUNDS, iterations=1)
        finally:
            if "d" in out:
                out.pop("d").close()
        t = MEDIANS["sparse-blockstream"] = _median(benchmark)
        record("sparse 1 TiB/64 MiB: QEMU block-stream", figure="%.3f s" % t,
               notes="median of %d" % SPARSE_ROUNDS)
        _ratio_row("sparse: blockpull speed-up over block-stream", "sparse-blockpull",
                   "sparse-blockstream")


# ---- rate limit ------------------------------------------------------------------------

@pytest.mark.parametrize("rate_mib", [10, 50, 200])
def test_rate_limit(benchmark, chains, rate_mib):
    """A chain holding 5 s worth of data at the limit; achieved = data / wall time."""
    size = rate_mib * MiB * 5
    c = chains.get("dense", "qcow2", size=size)
    out = {}

    def setup():
        out["p"] = c.fresh_top()
        return (out["p"],), {"bandwidth": rate_mib * MiB}
    benchmark.pedantic(blockpull_pull, setup=setup, rounds=1, iterations=1)
    t = _median(benchmark)
    got = size / t / MiB
    record(f"rate limit {rate_mib} MiB/s", figure="%.2f MiB/s" % got,
           notes="%.2f%% of the limit over %.2f s" % (got / rate_mib * 100, t))
    if rate_mib != 200:
        chains.drop("dense", "qcow2", size=size)


# ---- memory ----------------------------------------------------------------------------

# VmHWM, not getrusage: ru_maxrss survives execve and would report the parent's peak.
_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
import blockpull
with blockpull.open(sys.argv[1]) as img:
    img.pull().result()
with open("/proc/self/status") as f:
    print([l.split()[1] for l in f if l.startswith("VmHWM:")][0])
"""


def _child_rss(path: str) -> int:
    """Peak RSS in KiB (VmHWM) of a fresh interpreter that opens and pulls ``path``."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    r = run(sys.executable, "-c", _CHILD, path, src)
    return int(r.stdout.split()[-1])


def test_memory(benchmark, chains):
    small = chains.get("patterned", "qcow2", size=256 * MiB)
    big = chains.get("patterned", "qcow2", size=4 * GiB)
    rss = {}

    def target():
        rss["small"] = _child_rss(small.fresh_top())
        rss["big"] = _child_rss(big.fresh_top())
    benchmark.pedantic(target, rounds=1, iterations=1)
    d = (rss["big"] - rss["small"]) / 1024
    record("peak RSS, pull of 256 MiB", figure="%.1f MiB" % (rss["small"] / 1024))
    record("peak RSS, pull of 4 GiB", figure="%.1f MiB" % (rss["big"] / 1024),
           notes="%+.1f MiB over the 256 MiB pull" % d)
    chains.drop("patterned", "qcow2", size=4 * GiB)


# ---- info() ------------------------------------------------------------------------------

def test_info_latency(benchmark, chains):
    """info() while a (rate-limited, so long-running) pull is live on its thread."""
    c = chains.get("dense", "qcow2", size=DENSE)
    p = c.fresh_top("info")
    with blockpull.open(p) as img:
        job = img.pull(bandwidth=100 * MiB)
        try:
            benchmark.pedantic(job.info, rounds=200, iterations=100, warmup_rounds=5)
        finally:
            job.abort()
    t = _median(benchmark)
    record("info() latency during a pull", figure="%.2f us" % (t * 1e6),
           notes="median of 200 rounds x 100 calls")
    drop_file(p)


# ---- copy-on-read ------------------------------------------------------------------------

class TestCopyOnRead:
    BLOCK = 8 * MiB

    def _read_image(self, path, cor):
        buf = mmap.mmap(-1, self.BLOCK)  # page aligned, as a VMM's guest memory is
        with blockpull.open(path, readonly=not cor, copy_on_read=cor) as img:
            for off in range(0, img.size, self.BLOCK):
                n = min(self.BLOCK, img.size - off)
                img.readinto(off, memoryview(buf)[:n])
            if cor:
                img.flush()

    def test_plain_file(self, benchmark, chains):
        c = chains.get("dense", "qcow2", size=DENSE)

        def target():
            buf = mmap.mmap(-1, self.BLOCK)
            with open(c.ref_raw, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        benchmark.pedantic(target, rounds=ROUNDS, iterations=1)
        t = MEDIANS["read-plain"] = _median(benchmark)
        record("read whole disk: plain raw file", figure=_rate(DENSE, t))

    def test_chain(self, benchmark, chains):
        c = chains.get("dense", "qcow2", size=DENSE)
        benchmark.pedantic(self._read_image, args=(c.top, False), rounds=ROUNDS, iterations=1)
        t = MEDIANS["read-chain"] = _median(benchmark)
        record("read whole disk: through the chain", figure=_rate(DENSE, t),
               notes="%.2fx the plain file's time" % (t / MEDIANS["read-plain"])
               if "read-plain" in MEDIANS else "")

    def test_copy_on_read(self, benchmark, chains):
        c = chains.get("dense", "qcow2", size=DENSE)
        out = {}

        def setup():
            out["p"] = c.fresh_top("cor")
            return (out["p"], True), {}
        benchmark.pedantic(self._read_image, setup=setup, rounds=ROUNDS, iterations=1)
        run("qemu-img", "check", out["p"])
        t = MEDIANS["read-cor"] = _median(benchmark)
        record("read whole disk: copy-on-read (incl. flush)", figure=_rate(DENSE, t),
               notes="%.2fx the plain file's time" % (t / MEDIANS["read-plain"])
               if "read-plain" in MEDIANS else "")
        drop_file(out["p"])
