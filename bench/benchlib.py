"""Helpers of the benchmarks: chains built with qemu-img/qemu-io, QEMU as a peer, the
summary table."""
from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:  # an installed blockpull (pip install .) wins; else the in-place build under src/
    import blockpull  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(ROOT, "src"))
    import blockpull  # noqa: F401
#: the directory holding the blockpull package being measured
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(blockpull.__file__)))

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

RESULTS: Dict[str, dict] = {}
ORDER: List[str] = []


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.bench)


def record(name: str, **fields) -> None:
    """Keep one row of the summary table (the last write of a name wins)."""
    if name not in RESULTS:
        ORDER.append(name)
    RESULTS[name] = fields


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def fdatasync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def settle() -> None:
    """Write back everything dirty before a round, so that no round pays for another's."""
    os.sync()


def drop_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- building chains ------------------------------------------------------------------

class Chain:
    """A 3-layer chain base <- mid <- top; ``top`` is the pristine top image."""

    def __init__(self, d: str, fmt: str, size: int, data: int) -> None:
        self.dir = d
        self.fmt = fmt
        self.size = size
        self.data = data
        self.base = os.path.join(d, f"base.{fmt}")
        self.mid = os.path.join(d, f"mid.{fmt}")
        self.top = os.path.join(d, f"top.{fmt}")
        self.ref_raw: Optional[str] = None

    def fresh_top(self, name: str = "work") -> str:
        """A fresh copy of the top image next to the backing files (same relative links)."""
        dst = os.path.join(self.dir, f"{name}.{self.fmt}")
        drop_file(dst)
        shutil.copyfile(self.top, dst)
        settle()
        return dst

    def warm(self) -> None:
        """Read the backing files once so that the page cache holds them."""
        for p in (self.base, self.mid):
            with open(p, "rb") as f:
                while f.read(16 * MiB):
                    pass


def _qemu_io(path: str, fmt: str, cmds: List[str]) -> None:
    for i in range(0, len(cmds), 400):
        args = ["qemu-io", "-f", fmt]
        for c in cmds[i:i + 400]:
            args += ["-c", c]
        r = run(*args, path)
        if "error" in r.stdout.lower() or "failed" in r.stdout.lower():
            raise RuntimeError(f"qemu-io on {path}: {r.stdout[:500]}")


def build_dense(d: str, fmt: str, size: int) -> Chain:
    """``size`` bytes of random data: all of it in the base, every third MiB overwritten
    in the middle layer; the top is empty, so a pull copies ``size`` bytes from two layers
    in alternating runs."""
    os.makedirs(d, exist_ok=True)
    c = Chain(d, fmt, size, size)
    rnd = os.path.join(d, "data.raw")
    with open(rnd, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, rnd, c.base)
    os.unlink(rnd)
    stripe = os.path.join(d, "stripe.bin")
    with open(stripe, "wb") as f:
        f.write(os.urandom(MiB))
    run("qemu-img", "create", "-q", "-f", fmt, "-b", os.path.basename(c.base), "-F", fmt, c.mid)
    _qemu_io(c.mid, fmt, [f"write -s {stripe} {o} {MiB}" for o in range(MiB, size, 3 * MiB)])
    run("qemu-img", "create", "-q", "-f", fmt, "-b", os.path.basename(c.mid), "-F", fmt, c.top)
    c.ref_raw = os.path.join(d, "ref.raw")
    run("qemu-img", "convert", "-O", "raw", c.top, c.ref_raw)
    c.warm()
    return c


def build_sparse(d: str, fmt: str, size: int, data: int) -> Chain:
    """``data`` bytes in 1 MiB pieces spread evenly over a ``size`` disk, alternating
    between base and middle layer."""
    os.makedirs(d, exist_ok=True)
    c = Chain(d, fmt, size, data)
    stripe = os.path.join(d, "stripe.bin")
    with open(stripe, "wb") as f:
        f.write(os.urandom(MiB))
    pieces = data // MiB
    step = size // pieces
    offs = [i * step for i in range(pieces)]
    run("qemu-img", "create", "-q", "-f", fmt, c.base, str(size))
    _qemu_io(c.base, fmt, [f"write -s {stripe} {o} {MiB}" for o in offs[0::2]])
    run("qemu-img", "create", "-q", "-f", fmt, "-b", os.path.basename(c.base), "-F", fmt, c.mid)
    _qemu_io(c.mid, fmt, [f"write -s {stripe} {o} {MiB}" for o in offs[1::2]])
    run("qemu-img", "create", "-q", "-f", fmt, "-b", os.path.basename(c.mid), "-F", fmt, c.top)
    c.warm()
    return c


def build_patterned(d: str, fmt: str, size: int) -> Chain:
    """A cheap large chain for memory figures: pattern data over the whole disk."""
    os.makedirs(d, exist_ok=True)
    c = Chain(d, fmt, size, size)
    run("qemu-img", "create", "-q", "-f", fmt, c.base, str(size))
    _qemu_io(c.base, fmt, [f"write -P {0x10 + i % 200} {o} {min(GiB, size - o)}"
                           for i, o in enumerate(range(0, size, GiB))])
    run("qemu-img", "create", "-q", "-f", fmt, "-b", os.path.basename(c.base), "-F", fmt, c.mid)
    _qemu_io(c.mid, fmt, [f"write -P 0x77 {o} {MiB}" for o in range(MiB, size, 7 * MiB)])
    run("qemu-img", "create", "-q", "-f", fmt, "-b", os.path.basename(c.mid), "-F", fmt, c.top)
    return c


class Chains:
    def __init__(self, root: str) -> None:
        self.root = root
        self.cache: Dict[tuple, Chain] = {}

    def get(self, kind: str, fmt: str = "qcow2", **kw) -> Chain:
        key = (kind, fmt) + tuple(sorted(kw.items()))
        c = self.cache.get(key)
        if c is None:
            d = os.path.join(self.root, "-".join(str(k) for k in (kind, fmt) + tuple(kw.values())))
            builder = {"dense": build_dense, "sparse": build_sparse,
                       "patterned": build_patterned}[kind]
            c = self.cache[key] = builder(d, fmt, **kw)
            settle()
        else:
            c.warm() if kind != "patterned" else None
        return c

    def drop(self, kind: str, fmt: str = "qcow2", **kw) -> None:
        key = (kind, fmt) + tuple(sorted(kw.items()))
        c = self.cache.pop(key, None)
        if c is not None:
            shutil.rmtree(c.dir, ignore_errors=True)


# ---- the peers -------------------------------------------------------------------------

class StorageDaemon:
    """qemu-storage-daemon with one image (node ``top``) or several (``top0``.. ``topN-1``,
    ``images`` a list) open, driven over QMP."""

    # a connect attempt before the daemon listens is expected: not worth an ERROR line
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

    def __init__(self, image, fmt: str = "qcow2") -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.images = [image] if isinstance(image, str) else list(image)
        self.nodes = (["top"] if isinstance(image, str)
                      else [f"top{i}" for i in range(len(self.images))])
        self.sock = self.images[0] + ".qmp"
        drop_file(self.sock)
        args = ["qemu-storage-daemon"]
        for node, path in zip(self.nodes, self.images):
            args += ["--blockdev",
                     f"driver={fmt},node-name={node},file.driver=file,file.filename={path}"]
        args += ["--chardev", f"socket,id=mon,path={self.sock},server=on,wait=off",
                 "--monitor", "chardev=mon"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # the socket file appears at bind(), before listen(): retry until it answers
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("qemu-storage-daemon did not start: %s"
                                   % self.proc.stderr.read().decode())
            if os.path.exists(self.sock):
                self.qmp = QEMUMonitorProtocol(self.sock)
                try:
                    self.qmp.connect()
                    break
                except Exception:
                    self.qmp.close()
            time.sleep(0.005)

    def cpu(self) -> float:
        """User + system CPU seconds the daemon has used, from /proc/PID/stat."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stream(self, speed: int = 0) -> None:
        """Run block-stream on every node at once and wait until all have completed."""
        for i, node in enumerate(self.nodes):
            args = {"job-id": f"stream{i}", "device": node}
            if speed:
                args["speed"] = speed
            r = self.qmp.cmd_obj({"execute": "block-stream", "arguments": args})
            if "error" in r:
                raise RuntimeError(f"block-stream: {r['error']}")
        left = len(self.nodes)
        while left:
            ev = self.qmp.pull_event(wait=True)
            if ev["event"] == "BLOCK_JOB_COMPLETED":
                if ev["data"].get("error"):
                    raise RuntimeError(f"block-stream failed: {ev['data']['error']}")
                left -= 1
            elif ev["event"] == "BLOCK_JOB_ERROR":
                raise RuntimeError(f"block-stream error: {ev['data']}")

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        drop_file(self.sock)


def blockpull_pull(path: str, bandwidth: int = 0, backing_format: Optional[str] = None):
    """Open, pull, wait: the whole job including its final fdatasync and relink.
    QED records no backing format: name it (``backing_format``), formats are not guessed."""
    import blockpull
    with blockpull.open(path, backing_format=backing_format) as img:
        job = img.pull(bandwidth=bandwidth)
        return job.result()


# ---- reporting -------------------------------------------------------------------------

def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    fs = ""
    try:
        fs = run("df", "--output=fstype", os.environ.get("BLOCKPULL_BENCH_DIR") or
                 os.environ.get("TMPDIR", "/tmp")).stdout.split()[-1]
    except Exception:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "filesystem": fs, "loadavg": os.getloadavg(),
            "qemu": run("qemu-img", "--version").stdout.splitlines()[0]}


