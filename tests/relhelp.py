"""Helpers shared by the reliability tests (crash, power loss, I/O faults, load).

Chains are made by qemu-img/qemu-io with random data (so that a misplaced sector is seen,
which a fill pattern would hide), once per variant and session, and copied per round.
Seeds are fixed for CI; BLOCKPULL_SEED=<n> replaces them and every failure names the seed
that found it. BLOCKPULL_SOAK=1 turns on the long runs (tests marked ``slow``).
"""
from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest

import blockpull
from blockpull.formats import FORMATS

SOAK = os.environ.get("BLOCKPULL_SOAK", "") not in ("", "0")
SECTOR = 512
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the directory holding the blockpull package under test (src/ or site-packages)
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(blockpull.__file__)))


def seed_list(default: Sequence[int]) -> List[int]:
    """The seeds a test runs: BLOCKPULL_SEED (comma separated) if set, else ``default``."""
    env = os.environ.get("BLOCKPULL_SEED")
    if env:
        return [int(x) for x in env.split(",") if x.strip()]
    return list(default)


def soak_marks():
    """pytest marks for a soak-only test: ``slow`` (deselected unless asked for)."""
    return [pytest.mark.slow]


class Variant(NamedTuple):
    """A chain to build: format of the top, cluster size, compat, refcount bits, the
    base a pull keeps (None: whole chain), whether the top has extended L2 entries
    (subclusters); ``keep``: the base's data is compressible and compressed with this
    compression type ("zlib"/"zstd"), for pulls that keep it so."""
    name: str
    fmt: str = "qcow2"
    cluster: int = 65536
    compat: str = "1.1"
    refbits: int = 16
    base: Optional[str] = None
    size: int = 4 << 20
    keep: str = ""
    extl2: bool = False
    dirty: bool = False     # qcow2 top with lazy refcounts, its writer died: left dirty
    snapshot: bool = False  # qcow2 top with an internal snapshot (s1) between its writes


VARIANTS = {
    "v3": Variant("v3"),
    "v3-partial": Variant("v3-partial", cluster=4096, base="base.qcow2"),
    "v2": Variant("v2", compat="0.10", cluster=16384),
    "v2-partial": Variant("v2-partial", compat="0.10", base="base.qcow2"),
    "c512": Variant("c512", cluster=512, refbits=64, size=3 << 20),
    "extl2": Variant("extl2", cluster=32768, extl2=True),
    "extl2-partial": Variant("extl2-partial", base="base.qcow2", extl2=True),
    "extl2-snap": Variant("extl2-snap", cluster=32768, base="base.qcow2", extl2=True,
                          snapshot=True),
}
#: tops a writable open repairs first (a lazy-refcount writer killed), for the crash and
#: fault suites; not in VARIANTS: the power-loss replay starts from the file as repaired
REPAIR_VARIANTS = {
    "v3-lazy": Variant("v3-lazy", dirty=True),
    "v3-lazy-partial": Variant("v3-lazy-partial", cluster=4096, base="base.qcow2", dirty=True),
}
if "qed" in FORMATS:
    VARIANTS["qed"] = Variant("qed", fmt="qed", cluster=4096)
    VARIANTS["qed-partial"] = Variant("qed-partial", fmt="qed", cluster=4096, base="base.qcow2")
#: the variants that share a suite's default budget of rounds (their seeds stay as they
#: were); the extended-L2 ones run a few rounds of their own on top
CORE_NAMES = sorted(n for n, v in VARIANTS.items() if not v.extl2)


def _qemu(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def _write_random(path: str, rng: random.Random, writes: Sequence[Tuple[int, int]],
                  scratch: str, extra: Sequence[str] = (), compressible: bool = False) -> None:
    cmds: List[str] = []
    for i, (off, n) in enumerate(writes):
        src = f"{scratch}.{i}"
        with open(src, "wb") as f:
            if compressible:       # random runs of 64 bytes, each repeated 16 times
                f.write(b"".join(rng.randbytes(64) * 16 for _ in range(n // 1024 + 1))[:n])
            else:
                f.write(rng.randbytes(n))
        cmds += ["-c", f"write -q -s {src} {off} {n}"]
    for c in extra:
        cmds += ["-c", c]
    _qemu("qemu-io", *cmds, path)
    for i in range(len(writes)):
        os.unlink(f"{scratch}.{i}")


def build_chain(d: str, v: Variant, seed: int = 1) -> Dict[str, str]:
    """base.qcow2 <- mid.qcow2 <- top.<fmt> in ``d`` (relative backing names), random data:
    base covers most of the disk (one compressed cluster), mid overrides some and zeroes a
    cluster over base data, top has writes of its own."""
    rng = random.Random(seed)
    size = v.size
    os.makedirs(d, exist_ok=True)
    base = os.path.join(d, "base.qcow2")
    mid = os.path.join(d, "mid.qcow2")
    top = os.path.join(d, "top." + v.fmt)
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", base, str(size))
    _write_random(base, rng, [(0, size // 4), (size // 4 + 8192, size // 4),
                              (3 * size // 4 - 70000, size // 4 - 4096)],
                  os.path.join(d, "scratch"),
                  extra=[f"write -c -q -P 0x5a {size // 2 + 65536 * 2} 65536"],
                  compressible=bool(v.keep))
    if v.keep:
        _qemu("qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o",
              f"cluster_size=65536,compression_type={v.keep}", base, base + ".c")
        os.replace(base + ".c", base)
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
          "-o", "cluster_size=65536", mid, str(size))
    _write_random(mid, rng, [(100_000, 150_000), (size // 2 - 30_000, 60_000)],
                  os.path.join(d, "scratch"), extra=[f"write -q -z {65536 * 4} 65536"])
    opts = f"cluster_size={v.cluster}"
    if v.fmt == "qcow2":
        opts += f",compat={v.compat}"
        if v.compat == "1.1":
            opts += f",refcount_bits={v.refbits}"
        if v.extl2:
            opts += ",extended_l2=on"
        if v.dirty:
            opts += ",lazy_refcounts=on"
    _qemu("qemu-img", "create", "-q", "-f", v.fmt, "-b", "mid.qcow2", "-F", "qcow2",
          "-o", opts, top, str(size))
    # with subclusters: partly allocated clusters, and zero subclusters over data below
    extra = [f"write -q -z {size // 4 + 2048} 4096"] if v.extl2 else []
    _write_random(top, rng, [(size // 8, 5000), (size - 9000, 9000)], os.path.join(d, "scratch"),
                  extra=extra)
    if v.snapshot:
        # then the active view diverges from s1 inside clusters they share
        _qemu("qemu-img", "snapshot", "-c", "s1", top)
        _write_random(top, rng, [(size // 8 + 3000, 8000), (size // 2 - 20000, 70000)],
                      os.path.join(d, "scratch"), extra=[f"write -q -z {size // 8 + 512} 1024"])
    if v.dirty:
        # more writes, then the writer dies with its refcounts not written back
        r = subprocess.run(["qemu-io", "-c", f"write -q -P 0x33 {size // 3} 70000",
                            "-c", f"write -q -P 0x44 {size // 2 + 4096} 9000", "-c", "abort",
                            top], capture_output=True, text=True)
        assert r.returncode in (-6, 134), r
        with open(top, "rb") as f:
            assert struct.unpack(">Q", f.read(80)[72:80])[0] & 1, "not left dirty"
    return {"top": top, "mid": mid, "base": base, "dir": d}


def copy_chain(src: Dict[str, str], d: str) -> Dict[str, str]:
    os.makedirs(d, exist_ok=True)
    out = {"dir": d}
    for k in ("top", "mid", "base"):
        out[k] = os.path.join(d, os.path.basename(src[k]))
        shutil.copyfile(src[k], out[k])
    return out


def raw_of(path: str, out: str) -> bytes:
    """The disk's content as QEMU reads it."""
    _qemu("qemu-img", "convert", "-U", "-O", "raw", path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def qemu_check(path: str) -> Tuple[int, str]:
    r = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def assert_no_corruption(path: str, what: str) -> int:
    """qemu-img check: 0 (clean) or 3 (leaks only) pass; anything else fails."""
    rc, out = qemu_check(path)
    assert rc in (0, 3), f"{what}: qemu-img check exit {rc}\n{out}"
    return rc


def snapshot_of(path: str, out: str, name: str = "s1") -> bytes:
    """What internal snapshot ``name`` of ``path`` reads, as QEMU reads it."""
    _qemu("qemu-img", "convert", "-U", "-l", f"snapshot.name={name}", "-O", "raw", path, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def backing_of(path: str) -> Optional[str]:
    import json
    info = json.loads(_qemu("qemu-img", "info", "-U", "--output=json", path).stdout)
    return info.get("backing-filename")


class Model:
    """What a disk may read after a crash: the content before (``before``), and guest
    writes that may or may not have landed, except those whose flush returned (which
    must have). Guest writes never overlap; each one's part of a 512-byte sector reads
    either as before or as written, independently of another write in the same sector."""

    def __init__(self, before: bytes) -> None:
        self.before = bytes(before)
        self.writes: List[Tuple[int, bytes]] = []
        self.durable: set = set()

    def add(self, off: int, data: bytes) -> int:
        self.writes.append((off, bytes(data)))
        return len(self.writes) - 1

    def after(self, only: Optional[set] = None) -> bytes:
        buf = bytearray(self.before)
        for i, (off, data) in enumerate(self.writes):
            if only is None or i in only:
                buf[off:off + len(data)] = data
        return bytes(buf)

    def explain(self, got: bytes) -> Optional[str]:
        """None if ``got`` is a content the disk may hold, else what is wrong."""
        if len(got) != len(self.before):
            return f"size {len(got)} != {len(self.before)}"
        if not self.writes:
            if got == self.before:
                return None
            return _first_diff(got, self.before, "content before")
        # A guest write lands as a whole or not at all, sector by sector (a write that
        # spans clusters may be cut between them); writes never overlap, but two may share
        # a sector, and each of them may have landed or not independently of the other.
        touch: Dict[int, List[int]] = {}
        for i, (off, data) in enumerate(self.writes):
            for s in range(off // SECTOR, (off + len(data) - 1) // SECTOR + 1):
                touch.setdefault(s, []).append(i)
        for s in range(0, len(got), SECTOR):
            g = got[s:s + SECTOR]
            old = self.before[s:s + SECTOR]
            ws = touch.get(s // SECTOR)
            if not ws:
                if g != old:
                    return f"sector at {s} reads neither the old nor the written data"
                continue
            rest = bytearray(g)     # the sector with every write's part put back to old
            for i in ws:
                off, data = self.writes[i]
                lo, hi = max(off, s), min(off + len(data), s + SECTOR)
                part = g[lo - s:hi - s]
                if part != data[lo - off:hi - off]:
                    if i in self.durable:
                        return f"sector at {s} lost a flushed guest write"
                    if part != self.before[lo:hi]:
                        return f"sector at {s} reads neither the old nor the written data"
                rest[lo - s:hi - s] = self.before[lo:hi]
            if rest != old:
                return f"sector at {s} reads neither the old nor the written data"
        return None


def _first_diff(a: bytes, b: bytes, name: str) -> str:
    for i in range(0, len(a), SECTOR):
        if a[i:i + SECTOR] != b[i:i + SECTOR]:
            return f"differs from {name} at sector offset {i}"
    return f"differs from {name}"


def guest_extents(rng: random.Random, size: int, n: int) -> List[Tuple[int, int]]:
    """``n`` non-overlapping random extents (any alignment) inside the disk."""
    out: List[Tuple[int, int]] = []
    tries = 0
    while len(out) < n and tries < n * 50:
        tries += 1
        ln = rng.choice([1, 100, 511, 512, 4096, 5000, 65536, 70000])
        off = rng.randrange(0, size - ln)
        if any(off < o + l and off + ln > o for o, l in out):
            continue
        out.append((off, ln))
    return out


def child_env(*paths: str) -> Dict[str, str]:
    """The environment for a child interpreter: it imports the same blockpull as the
    tests (then ``paths``, then what PYTHONPATH held)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PKG_ROOT, *paths] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PY = sys.executable
