"""Pulls where the copy is costly, side by side with QEMU's block-stream in one run.

- *slow backing*: the template is served by nbdkit's file plugin behind its delay filter
  (``rdelay`` per read request) and appears as a file through nbdfuse; the overlay's backing
  file is that file, for blockpull and for QEMU alike;
- *compressed templates*: a zlib and a zstd compressed qcow2 template of text-like data,
  inflated (as QEMU does) and kept compressed (``compressed="keep"``, beyond QEMU);
- *cold cache*: the dense chain with the page cache dropped before every round, beside fio's
  figure for the same disk reading one file while writing another (the copy's ceiling);
- *eight at once*: eight overlays of one template pulled together, against eight block-stream
  jobs in one qemu-storage-daemon.

Every row gives the median time of the rounds, the ratio, and CPU seconds per GiB copied for
both (blockpull: this process's CPU time; QEMU: the daemon's, from /proc). Cold rows need
``/proc/sys/vm/drop_caches`` (root): where it cannot be written, the output says so and those
rows are skipped rather than reported warm.
"""
from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, List, Optional

import pytest

from benchlib import GiB, MiB, StorageDaemon, drop_file, fdatasync_path, record, run, settle

import blockpull

ROUNDS = int(os.environ.get("BLOCKPULL_BENCH_COSTLY_ROUNDS", "3"))
SLOW_SIZE = int(os.environ.get("BLOCKPULL_BENCH_SLOW_SIZE", str(128 * MiB)))
SLOW_DELAYS = os.environ.get("BLOCKPULL_BENCH_SLOW_DELAYS", "1ms,5ms,20ms").split(",")
COMP_SIZE = int(os.environ.get("BLOCKPULL_BENCH_COMP_SIZE", str(512 * MiB)))
COLD_SIZE = int(os.environ.get("BLOCKPULL_BENCH_COLD_SIZE", str(512 * MiB)))
MANY = int(os.environ.get("BLOCKPULL_BENCH_MANY", "8"))
MANY_SIZE = int(os.environ.get("BLOCKPULL_BENCH_MANY_SIZE", str(256 * MiB)))
DROP_CACHES = "/proc/sys/vm/drop_caches"


def _need(*tools: str) -> None:
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} required: run bench/setup")


def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    """Write back, then drop the page cache (clean pages, dentries, inodes)."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


# ---- the contenders --------------------------------------------------------------------

def blockpull_all(images: List[str], compressed: str = "inflate") -> None:
    """Open every image, start every pull, wait for all (each ends durable and relinked)."""
    imgs = [blockpull.open(p) for p in images]
    try:
        jobs = [img.pull(compressed=compressed) for img in imgs]
        for j in jobs:
            j.result()
    finally:
        for img in imgs:
            img.close()


def qemu_all(images: List[str]) -> float:
    """block-stream every image in one daemon; returns the daemon's CPU seconds."""
    d = StorageDaemon(images)
    try:
        c0 = d.cpu()
        d.stream()
        for p in images:
            fdatasync_path(p)
        return d.cpu() - c0
    finally:
        d.close()


def compare(fresh: Callable[[int], List[str]], nbytes: int, label: str,
            cold: bool = False, compressed: str = "inflate",
            ceiling: Optional[Callable[[], float]] = None) -> Dict[str, float]:
    """Rounds in which blockpull (its pulls' ``compressed``) and QEMU each pull fresh tops
    once (order rotating), the page cache dropped before each run when ``cold``. Records
    the medians, the ratio and CPU seconds per GiB; returns the medians (seconds), with
    the median of ``ceiling()`` (MiB/s, run once a round in the same rotation) under
    "ceiling" when given."""
    times: Dict[str, List[float]] = {"blockpull": [], "QEMU block-stream": []}
    cpu: Dict[str, List[float]] = {"blockpull": [], "QEMU block-stream": []}
    ceilings: List[float] = []
    for r in range(ROUNDS):
        order = ["blockpull", "QEMU block-stream"] + (["ceiling"] if ceiling else [])
        order = order[r % len(order):] + order[:r % len(order)]
        for who in order:
            if who == "ceiling":
                settle()
                ceilings.append(ceiling())  # type: ignore[misc]
                continue
            images = fresh(r)
            settle()
            if cold:
                drop_caches()
            if who == "blockpull":
                c0 = _cpu_self()
                t0 = time.perf_counter()
                blockpull_all(images, compressed)
                times[who].append(time.perf_counter() - t0)
                cpu[who].append(_cpu_self() - c0)
            else:
                t0 = time.perf_counter()
                cpu[who].append(qemu_all(images))
                times[who].append(time.perf_counter() - t0)
            for p in images:
                run("qemu-img", "check", "-q", p)
    med = {k: statistics.median(v) for k, v in times.items()}
    bp, qm = med["blockpull"], med["QEMU block-stream"]
    per_gib = {k: statistics.median(v) / (nbytes / GiB) for k, v in cpu.items()}
    record(f"{label}: blockpull", figure="%.0f MiB/s" % (nbytes / bp / MiB),
           notes="median of %d, %.2f s; %.2f CPU s/GiB" % (ROUNDS, bp, per_gib["blockpull"]))
    record(f"{label}: QEMU block-stream", figure="%.0f MiB/s" % (nbytes / qm / MiB),
           notes="median of %d, %.2f s; %.2f CPU s/GiB" % (ROUNDS, qm,
                                                           per_gib["QEMU block-stream"]))
    record(f"{label}: ratio", figure="%.2fx" % (qm / bp),
           notes="> 1 means blockpull is faster")
    if ceilings:
        med["ceiling"] = statistics.median(ceilings)
    return med


# ---- templates -------------------------------------------------------------------------

def random_raw(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n


WORDS = ("the of and to in is was for on that with as by at from his her it an were are "
         "which this be or has had not but first one their its new after who they have two "
         "she been other when there all during into school time may years more most only "
         "over city some world would where later up such used many can state about national "
         "out known university united then made season part under age").split()


def text_raw(path: str, size: int) -> None:
    """Text-like data (words, lines, numbers) that compresses about as well as a root
    file system's files do: a seeded generator, so every run compresses the same bytes."""
    rng = random.Random(15)
    block = []
    n = 0
    while n < 8 * MiB:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 16)))
        line += " %d\n" % rng.randrange(1 << 20)
        block.append(line)
        n += len(line)
    data = "".join(block).encode()[:8 * MiB]
    with open(path, "wb") as f:
        for i in range(0, size, 8 * MiB):
            head = b"block %08d\n" % i
            f.write((head + data)[:min(8 * MiB, size - i)])


def overlay(path: str, backing: str) -> str:
    drop_file(path)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)
    return path


@pytest.fixture(scope="module")
def costly_dir(workdir):
    d = os.path.join(workdir, "costly")
    os.makedirs(d, exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---- slow backing ------------------------------------------------------------------------

class SlowFile:
    """``path`` served by nbdkit (file plugin, delay filter) and mounted as a file by
    nbdfuse: every read of the mounted file waits ``rdelay`` per NBD request."""

    def __init__(self, path: str, rdelay: str) -> None:
        self.mnt = tempfile.mkdtemp(prefix="slow-", dir=os.path.dirname(path))
        pidfile = os.path.join(os.path.dirname(path), "nbdfuse.pid")
        drop_file(pidfile)
        self.proc = subprocess.Popen(
            ["nbdfuse", "-r", "-P", pidfile, self.mnt, "--command", "nbdkit", "-s",
             "--exit-with-parent", "--filter=delay", "file", path, f"rdelay={rdelay}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("nbdfuse did not start: %s"
                                   % (self.proc.stderr.read() or b"").decode())
            time.sleep(0.02)
        self.path = os.path.join(self.mnt, "nbd")

    def close(self) -> None:
        subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.mnt, ignore_errors=True)


@pytest.mark.parametrize("rdelay", SLOW_DELAYS)
def test_slow_backing(benchmark, costly_dir, rdelay):
    """The template behind ``rdelay`` per read request (nbdkit delay filter via nbdfuse)."""
    _need("nbdkit", "nbdfuse", "fusermount3", "qemu-storage-daemon")
    d = os.path.join(costly_dir, "slow")
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, "base.qcow2")
    if not os.path.exists(base):
        raw = os.path.join(d, "data.raw")
        random_raw(raw, SLOW_SIZE)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
        os.unlink(raw)
    slow = SlowFile(base, rdelay)
    try:
        def fresh(r):
            return [overlay(os.path.join(d, "top.qcow2"), slow.path)]
        if not can_drop_caches():
            print("cannot write %s: the slow-backing rows run with whatever the page "
                  "cache holds of the mounted file" % DROP_CACHES)
        benchmark.pedantic(lambda: compare(fresh, SLOW_SIZE, f"slow backing {rdelay}",
                                           cold=can_drop_caches()), rounds=1, iterations=1)
    finally:
        slow.close()


# ---- compressed templates ----------------------------------------------------------------

def _compressed_base(costly_dir: str, ctype: str) -> str:
    """The compressed template of ``ctype`` (made once), read into the page cache."""
    _need("qemu-storage-daemon")
    d = os.path.join(costly_dir, f"comp-{ctype}")
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, "base.qcow2")
    if not os.path.exists(base):
        raw = os.path.join(d, "data.raw")
        text_raw(raw, COMP_SIZE)
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
            "-o", f"compression_type={ctype}", raw, base)
        os.unlink(raw)
    with open(base, "rb") as f:  # warm: the cost measured is inflating, not reading
        while f.read(16 * MiB):
            pass
    return d


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_template(benchmark, costly_dir, ctype):
    """A compressed template of text-like data (how most cloud images ship)."""
    d = _compressed_base(costly_dir, ctype)

    def fresh(r):
        return [overlay(os.path.join(d, "top.qcow2"), "base.qcow2")]
    benchmark.pedantic(lambda: compare(fresh, COMP_SIZE, f"compressed {ctype} template"),
                       rounds=1, iterations=1)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_template_keep(benchmark, costly_dir, ctype):
    """The same template pulled with ``compressed="keep"``: its compressed clusters are
    copied as they are (QEMU's block-stream has no such mode and inflates them)."""
    d = _compressed_base(costly_dir, ctype)

    def fresh(r):
        return [overlay(os.path.join(d, "top.qcow2"), "base.qcow2")]
    benchmark.pedantic(lambda: compare(fresh, COMP_SIZE, f"compressed {ctype} template, keep",
                                       compressed="keep"),
                       rounds=1, iterations=1)


# ---- cold cache ----------------------------------------------------------------------------

FIO_READERS = 4   # as many sequential readers as a pull's default chunk reads in flight


def fio_ceiling(src: str, dst: str, size: int) -> float:
    """MiB/s of a copy by fio: ``FIO_READERS`` sequential readers, each reading its own
    part of ``src`` (page cache dropped first), while one sequential writer fills ``dst``
    with as many bytes and syncs it, all through the page cache as a pull's reads and
    writes go, 8 MiB requests, the hint fio gives by default (``fadvise_hint``). The rate
    is ``size`` over the longest job's time (the writer's includes its sync): the disk's
    concurrent read+write figure, which bounds a copy."""
    import json as _json
    part = size // FIO_READERS
    drop_file(dst)
    drop_caches()
    r = run("fio", "--output-format=json", "--direct=0", "--ioengine=psync", "--bs=8M",
            "--name=read", f"--filename={src}", "--rw=read", f"--numjobs={FIO_READERS}",
            f"--size={part}", f"--offset_increment={part}",
            "--name=write", f"--filename={dst}", "--rw=write", f"--size={size}",
            "--numjobs=1", "--end_fsync=1")
    jobs = _json.loads(r.stdout)["jobs"]
    drop_file(dst)
    longest = max(j["job_runtime"] for j in jobs) / 1000.0   # ms
    return size / MiB / longest


def test_cold_dense(benchmark, costly_dir):
    """A dense template not in the page cache, beside fio's read+write ceiling."""
    _need("fio", "qemu-storage-daemon")
    if not can_drop_caches():
        pytest.skip(f"cannot write {DROP_CACHES}: no cold-cache figures (not reported warm)")
    d = os.path.join(costly_dir, "cold")
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, "base.qcow2")
    raw = os.path.join(d, "data.raw")
    if not os.path.exists(base):
        random_raw(raw, COLD_SIZE)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)

    def fresh(r):
        return [overlay(os.path.join(d, "top.qcow2"), "base.qcow2")]

    def both():
        med = compare(fresh, COLD_SIZE, "cold cache dense", cold=True,
                      ceiling=lambda: fio_ceiling(raw, os.path.join(d, "fio.out"), COLD_SIZE))
        rate = COLD_SIZE / med["blockpull"] / MiB
        record("cold cache dense: fio read+write ceiling",
               figure="%.0f MiB/s" % med["ceiling"],
               notes="median of %d in the same rotation; blockpull reaches %.2f of it"
               % (ROUNDS, rate / med["ceiling"]))
    benchmark.pedantic(both, rounds=1, iterations=1)


# ---- eight at once ---------------------------------------------------------------------------

def test_many_at_once(benchmark, costly_dir):
    """MANY overlays of one template pulled at once (a provisioning burst)."""
    _need("qemu-storage-daemon")
    d = os.path.join(costly_dir, "many")
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, "base.qcow2")
    if not os.path.exists(base):
        raw = os.path.join(d, "data.raw")
        random_raw(raw, MANY_SIZE)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base)
        os.unlink(raw)
    with open(base, "rb") as f:
        while f.read(16 * MiB):
            pass

    def fresh(r):
        return [overlay(os.path.join(d, f"top{i}.qcow2"), "base.qcow2") for i in range(MANY)]

    def all_three():
        compare(fresh, MANY * MANY_SIZE, f"{MANY} pulls at once")
        burst(fresh)
    benchmark.pedantic(all_three, rounds=1, iterations=1)


def _proc_io_read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (``/proc/self/io``: every
    thread's reads that missed the page cache)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
        return True
    except OSError:
        return False


def _rss_mib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no " + field)


def burst(fresh: Callable[[int], List[str]]) -> None:
    """The provisioning burst against one pull at a time of the same bytes: the MANY
    overlays pulled one after another, then all at once, each way starting with the
    template cold (page cache dropped): aggregate rates (medians), how many bytes the
    burst read from the disk
    against the template's size, and its peak memory (this process's RSS high-water mark,
    reset before the burst)."""
    seq: List[float] = []
    together: List[float] = []
    disk: List[int] = []
    peak: List[float] = []
    grew: List[float] = []
    cold = can_drop_caches()
    for r in range(ROUNDS):
        images = fresh(r)
        settle()
        if cold:
            drop_caches()        # both ways start from a cold template
        t0 = time.perf_counter()
        for p in images:
            blockpull_all([p])
        seq.append(time.perf_counter() - t0)
        images = fresh(r)
        settle()
        if cold:
            drop_caches()
        reset = _reset_peak_rss()
        rss0 = _rss_mib("VmRSS")
        io0 = _proc_io_read_bytes()
        t0 = time.perf_counter()
        blockpull_all(images)
        together.append(time.perf_counter() - t0)
        disk.append(_proc_io_read_bytes() - io0)
        if reset:
            peak.append(_rss_mib("VmHWM"))
            grew.append(peak[-1] - rss0)
    nbytes = MANY * MANY_SIZE
    s, t = statistics.median(seq), statistics.median(together)
    record(f"{MANY} pulls one after another (same bytes)" + (", template cold" if cold else ""),
           figure="%.0f MiB/s" % (nbytes / s / MiB),
           notes="median of %d, %.2f s" % (ROUNDS, s))
    record(f"{MANY} pulls at once, template cold" if cold else
           f"{MANY} pulls at once (warm: cannot drop the page cache)",
           figure="%.0f MiB/s" % (nbytes / t / MiB),
           notes="%.2fx one after another; median of %d" % (s / t, ROUNDS))
    if cold:
        record(f"{MANY} pulls at once: template bytes read from disk",
               figure="%.0f MiB" % (statistics.median(disk) / MiB),
               notes="the template holds %.0f MiB" % (MANY_SIZE / MiB))
    if peak:
        record(f"{MANY} pulls at once: peak RSS", figure="%.0f MiB" % max(peak),
               notes="highest of %d rounds, whole benchmark process; %.0f MiB above its "
               "size before the burst" % (len(peak), max(grew)))
