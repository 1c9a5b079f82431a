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

from benchlib import (PKG_ROOT, GiB, MiB, TiB, StorageDaemon, blockpull_pull, drop_file, fdatasync_path,
                      record, run, settle)

import blockpull
from blockpull import formats

ROUNDS = int(os.environ.get("BLOCKPULL_BENCH_ROUNDS", "5"))
#: a directory holding another build of the package (e.g. the last release's ``src``):
#: the dense and sparse benchmarks then pull with it too, each build in a child interpreter
PREVIOUS = os.environ.get("BLOCKPULL_BENCH_PREVIOUS")
DENSE = GiB
FORMATS = [f for f in ("qcow2", "qed") if f in formats.FORMATS]


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


def _bfmt(fmt: str):
    """The backing format to name when opening: QED records none."""
    return fmt if fmt == "qed" else None


class Peer:
    """One contender of a side-by-side benchmark: ``setup`` (untimed) returns the argument
    of ``run`` (timed, ends with the copy durable); ``check`` judges the last output."""

    def __init__(self, name, setup, run, check=None, teardown=None):
        self.name, self.setup, self.run, self.check = name, setup, run, check
        self.teardown = teardown
        self.times: list = []


def side_by_side(benchmark, peers, rounds):
    """Rounds in which every peer runs once, in an order that rotates from round to round,
    so that a change in the machine's load falls on all of them alike. Returns the median
    time of each peer."""
    state = {"round": 0}

    def one_round():
        k = state["round"] % len(peers)
        state["round"] += 1
        for peer in peers[k:] + peers[:k]:
            arg = peer.setup()
            t0 = time.perf_counter()
            peer.run(arg)
            peer.times.append(time.perf_counter() - t0)
            if peer.teardown is not None:
                peer.teardown(arg)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    for peer in peers:
        if peer.check is not None:
            peer.check()
    benchmark.extra_info["times"] = {p.name: p.times for p in peers}
    return {p.name: statistics.median(p.times) for p in peers}


def _pull_peer(name, c, fmt):
    out = {}

    def setup():
        out["p"] = c.fresh_top()
        return out["p"]

    def run_pull(path):
        with blockpull.open(path, backing_format=_bfmt(fmt)) as img:
            img.pull().result()

    return Peer(name, setup, run_pull, lambda: _verify_pulled(out["p"], c.ref_raw, fmt))


_CHILD_PULL = ("import sys, blockpull\n"
               "fmt = sys.argv[2] or None\n"
               "with blockpull.open(sys.argv[1], backing_format=fmt) as img:\n"
               "    img.pull().result()\n")


def _child_pull_peer(name, c, fmt, pkg_root):
    """A pull in a fresh interpreter importing blockpull from ``pkg_root``: the same
    start-up cost for every build compared this way."""
    out = {}
    env = dict(os.environ, PYTHONPATH=pkg_root)

    def setup():
        out["p"] = c.fresh_top()
        return out["p"]

    def run_pull(path):
        run(sys.executable, "-c", _CHILD_PULL, path, _bfmt(fmt) or "", env=env)

    return Peer(name, setup, run_pull, lambda: _verify_pulled(out["p"], c.ref_raw, fmt))


def _previous_peers(c, fmt):
    """This build and the previous one, both in child interpreters (BLOCKPULL_BENCH_PREVIOUS)."""
    if not PREVIOUS:
        return []
    return [_child_pull_peer("blockpull child (this build)", c, fmt, PKG_ROOT),
            _child_pull_peer("blockpull child (previous build)", c, fmt, PREVIOUS)]


def _stream_peer(c, fmt, check_raw=True):
    out = {}

    def setup():
        out["p"] = c.fresh_top()
        out["d"] = StorageDaemon(out["p"], fmt)
        return out["d"]

    def run_stream(d):
        d.stream()
        fdatasync_path(out["p"])

    def check():
        if check_raw:
            run("qemu-img", "compare", "-f", fmt, "-F", "raw", out["p"], c.ref_raw)
    return Peer("QEMU block-stream", setup, run_stream, check, lambda d: d.close())


# ---- dense chain: 1 GiB of random data over three layers --------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_dense(benchmark, chains, fmt):
    """blockpull, QEMU block-stream, qemu-img convert, cp."""
    c = chains.get("dense", fmt, size=DENSE)
    conv = os.path.join(c.dir, f"converted.{fmt}")
    copied = os.path.join(c.dir, "copied.raw")

    def fresh(path):
        def setup():
            drop_file(path)
            settle()
            return path
        return setup

    def convert(dst):
        run("qemu-img", "convert", "-f", fmt, "-O", fmt, c.top, dst)
        fdatasync_path(dst)

    def cp(dst):
        run("cp", c.ref_raw, dst)
        fdatasync_path(dst)

    with open(c.ref_raw, "rb") as f:  # cp reads it: have it cached like the chain
        while f.read(16 * MiB):
            pass
    peers = [_pull_peer("blockpull", c, fmt), _stream_peer(c, fmt),
             Peer(f"qemu-img convert -O {fmt}", fresh(conv), convert,
                  lambda: run("qemu-img", "compare", "-f", fmt, "-F", "raw", conv, c.ref_raw)),
             Peer("cp of the same bytes (raw)", fresh(copied), cp)] + _previous_peers(c, fmt)
    med = side_by_side(benchmark, peers, ROUNDS)
    drop_file(conv)
    drop_file(copied)
    bp = med["blockpull"]
    for name, t in med.items():
        note = "median of %d, %.3f s" % (ROUNDS, t)
        if name != "blockpull":
            note += "; blockpull is %.2fx as fast" % (t / bp)
        record(f"dense {fmt}: {name}", figure=_rate(DENSE, t), notes=note)
    if PREVIOUS:
        this = med["blockpull child (this build)"]
        old = med["blockpull child (previous build)"]
        record(f"dense {fmt}: this build vs previous", figure="%.2fx" % (old / this),
               notes="child interpreters; > 1 means this build is faster")


POLL_PULLS = int(os.environ.get("BLOCKPULL_BENCH_POLL_PULLS", "20"))
POLL_WINDOW = 0.030


def _alternating_pull(path: str, poll_first: bool) -> tuple:
    """One pull whose time is cut into POLL_WINDOW windows that alternate between polling
    ``info()`` at 1 kHz and not polling at all. Returns (bytes, seconds) copied in the
    polled windows and in the quiet ones, from ``info().cur`` at each window's edges; the
    first window (the job starting) is left out of both."""
    on_b = on_t = off_b = off_t = 0.0
    polls = 0
    with blockpull.open(path) as img:
        job = img.pull()
        poll, k = poll_first, 0
        t0, c0 = time.perf_counter(), job.info().cur
        while not job.done():
            end = t0 + POLL_WINDOW
            n = 0
            if poll:
                nxt = t0
                while not job.done():
                    job.info()
                    n += 1
                    nxt += 0.001
                    if nxt >= end:
                        break
                    d = nxt - time.perf_counter()
                    if d > 0:
                        time.sleep(d)
            else:
                d = end - time.perf_counter()
                if d > 0:
                    time.sleep(d)
            if job.done():
                break   # the last, partial window is left out too
            t1, c1 = time.perf_counter(), job.info().cur
            if k:
                if poll:
                    on_b, on_t, polls = on_b + c1 - c0, on_t + t1 - t0, polls + n
                else:
                    off_b, off_t = off_b + c1 - c0, off_t + t1 - t0
            k += 1
            t0, c0, poll = t1, c1, not poll
        job.result()
    return on_b, on_t, off_b, off_t, polls


def test_info_polling_cost(benchmark, chains):
    """The throughput cost of another thread polling info() at 1 kHz. Whole pulls with
    and without polling differ by +-10% from run to run on a shared machine, far more than
    the effect, so the comparison is made inside each pull: 30 ms windows alternate
    between polling and not, the phase alternates from pull to pull, and the cost is
    1 - (rate in polled windows) / (rate in quiet windows) over all pulls. Its spread is
    given by the same figure per pair of pulls (one of each phase)."""
    c = chains.get("dense", "qcow2", size=DENSE)
    runs, last = [], []

    def one_pull():
        path = c.fresh_top()
        runs.append(_alternating_pull(path, poll_first=len(runs) % 2 == 0))
        last[:] = [path]

    benchmark.pedantic(one_pull, rounds=POLL_PULLS, iterations=1)
    _verify_pulled(last[0], c.ref_raw, "qcow2")
    on_b, on_t, off_b, off_t = (sum(r[i] for r in runs) for i in range(4))
    cost = (1 - (on_b / on_t) / (off_b / off_t)) * 100
    pairs = []
    for a, b in zip(runs[0::2], runs[1::2]):
        pon = (a[0] + b[0]) / (a[1] + b[1])
        poff = (a[2] + b[2]) / (a[3] + b[3])
        pairs.append((1 - pon / poff) * 100)
    pairs.sort()
    benchmark.extra_info["pair_costs_percent"] = pairs
    record("dense qcow2: info() polled at 1 kHz, throughput cost", figure="%+.2f%%" % cost,
           notes="%d pulls, %d polls/s in polled windows; %.0f MiB/s polled vs %.0f MiB/s quiet "
                 "(copy loop, fdatasync excluded); per pair of pulls %+.1f%% .. %+.1f%%, median %+.1f%%"
                 % (len(runs), sum(r[4] for r in runs) / on_t, on_b / on_t / MiB, off_b / off_t / MiB,
                    pairs[0], pairs[-1], statistics.median(pairs)))


# ---- sparse chain: 1 TiB virtual, 64 MiB of data ---------------------------------------

SPARSE_ROUNDS = max(3, ROUNDS // 2 + 1)


def test_sparse(benchmark, chains):
    c = chains.get("sparse", "qcow2", size=TiB, data=64 * MiB)
    pull = _pull_peer("blockpull", c, "qcow2")
    pull.check = None
    prev = _previous_peers(c, "qcow2")
    for p in prev:
        p.check = None
    med = side_by_side(benchmark, [pull, _stream_peer(c, "qcow2", check_raw=False)] + prev,
                       SPARSE_ROUNDS)
    bp, qs = med["blockpull"], med["QEMU block-stream"]
    record("sparse 1 TiB/64 MiB: blockpull", figure="%.3f s" % bp,
           notes="median of %d; %.0f MiB/s of data" % (SPARSE_ROUNDS, 64 / bp))
    record("sparse 1 TiB/64 MiB: QEMU block-stream", figure="%.3f s" % qs,
           notes="median of %d; blockpull is %.1fx as fast" % (SPARSE_ROUNDS, qs / bp))
    if prev:
        this, old = med[prev[0].name], med[prev[1].name]
        for p in prev:
            record(f"sparse 1 TiB/64 MiB: {p.name}", figure="%.3f s" % med[p.name],
                   notes="median of %d" % SPARSE_ROUNDS)
        record("sparse 1 TiB/64 MiB: this build vs previous", figure="%.2fx" % (old / this),
               notes="child interpreters; > 1 means this build is faster")


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
    r = run(sys.executable, "-c", _CHILD, path, PKG_ROOT)
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

BLOCK = 8 * MiB


def test_copy_on_read(benchmark, chains):
    """Read the whole disk in 8 MiB reads into a page-aligned buffer (as a VMM's guest
    memory is): the raw file of the same bytes with plain reads, the chain through
    blockpull, and the chain through blockpull with copy-on-read (its flush included)."""
    c = chains.get("dense", "qcow2", size=DENSE)
    buf = mmap.mmap(-1, BLOCK)
    out = {}

    def plain(_):
        with open(c.ref_raw, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    def through(path_cor):
        path, cor = path_cor
        with blockpull.open(path, readonly=not cor, copy_on_read=cor) as img:
            for off in range(0, img.size, BLOCK):
                img.readinto(off, memoryview(buf)[:min(BLOCK, img.size - off)])
            if cor:
                img.flush()

    def cor_setup():
        out["p"] = c.fresh_top("cor")
        return (out["p"], True)

    def cor_check():
        run("qemu-img", "check", out["p"])
        run("qemu-img", "compare", "-F", "raw", out["p"], c.ref_raw)
    peers = [Peer("plain reads of the raw file", lambda: None, plain),
             Peer("reads through the chain", lambda: (c.top, False), through),
             Peer("reads with copy-on-read (and flush)", cor_setup, through, cor_check)]
    med = side_by_side(benchmark, peers, ROUNDS)
    base = med["plain reads of the raw file"]
    for name, t in med.items():
        record(f"whole-disk read: {name}", figure=_rate(DENSE, t),
               notes="median of %d, %.3f s; %.2fx the plain reads' time" % (ROUNDS, t, t / base))
    drop_file(out["p"])
