"""``blockpull demo``: build a sample chain, pull it, verify it, summarise.

The demo's data generator lives here too: ``build_demo_chain`` (a template with varied
data and an overlay with writes of its own) and ``content_digest`` (the SHA-256 of what a
chain reads). ``demo --serve`` is ``blockpull.cli.vmdemo``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import blockpull
from blockpull.cli.common import (EXIT_OK, PROG, MiB, OperationFailed, UsageError,
                                  add_output, add_progress, bandwidth_arg, size_arg, want_bar)
from blockpull.cli.output import Progress, emit_json
from blockpull.cli.pull import run_pull
from blockpull.image import Image
from blockpull.paths import kernel_abspath
from blockpull.job import PullInfo
from blockpull.units import format_size

__all__ = ["add_parser", "cmd_demo", "build_demo_chain", "content_digest", "DemoChain",
           "DEMO_DATA", "DEMO_BANDWIDTH"]

#: bytes of data in the demo's template, and its pull's bytes/s, unless told otherwise
DEMO_DATA = 384 * MiB
DEMO_BANDWIDTH = 128 * MiB
_DIGEST_BLOCK = MiB
_STAMP_EVERY = 64 << 10


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``demo`` to the subcommands ``sub``."""
    p = sub.add_parser("demo", parents=[common], help="build a sample chain and pull it",
                       description="Build a qcow2 template with data and an overlay with "
                                   "writes of its own, pull the overlay under a bandwidth "
                                   "limit, and verify it reads the same as the chain did.")
    p.add_argument("directory", metavar="DIR", nargs="?",
                   help="where to build the images (kept); default: a temporary directory, "
                        "removed afterwards unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--size", type=size_arg, default=DEMO_DATA, metavar="SIZE",
                   help=f"data in the template (default {format_size(DEMO_DATA)})")
    p.add_argument("--bandwidth", type=bandwidth_arg, default=DEMO_BANDWIDTH, metavar="RATE",
                   help=f"pull speed limit (default {DEMO_BANDWIDTH >> 20}M; 0 = unlimited)")
    add_progress(p)
    add_output(p)
    p.set_defaults(func=cmd_demo)


# ---- the demo's data ----------------------------------------------------------------------


class _Pools:
    """Source material for demo data: random bytes (like compressed or encrypted files),
    text (like logs and configs) and binary records (like a database), each 4 MiB."""

    def __init__(self, rng: random.Random) -> None:
        n = 4 * MiB
        self.random = rng.randbytes(n)
        words = ["kernel", "disk", "sda1", "eth0", "systemd", "started", "stopped", "user",
                 "session", "cron", "backup", "completed", "error", "warning", "mounted",
                 "/var/lib", "/etc/hosts", "connection", "from", "port", "accepted", "key"]
        lines = []
        total = 0
        i = 0
        while total < n:
            line = (f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:"
                    f"{(i * 7) % 60:02d} host{i % 5} "
                    + " ".join(rng.choice(words) for _ in range(3 + i % 9))
                    + f" id={rng.getrandbits(32):08x}\n")
            lines.append(line)
            total += len(line)
            i += 1
        self.text = "".join(lines).encode()[:n]
        rec = struct.Struct("<QQd8s")
        self.records = b"".join(rec.pack(i, (i * 2654435761) & 0xFFFFFFFF, i / 7.0,
                                         b"row%05d" % (i % 100000))
                                for i in range(n // rec.size + 1))[:n]

    def fill(self, rng: random.Random, vaddr: int, length: int) -> bytearray:
        """``length`` bytes of one kind, stamped with their disk offset every 64 KiB so
        that no two clusters of the demo disk are alike."""
        pool = rng.choice((self.random, self.random, self.text, self.records))
        start = rng.randrange(len(pool))
        buf = bytearray()
        while len(buf) < length:
            take = min(length - len(buf), len(pool) - start)
            buf += pool[start:start + take]
            start = 0
        first = -vaddr % _STAMP_EVERY
        for off in range(first, length - 7, _STAMP_EVERY):
            struct.pack_into("<Q", buf, off, vaddr + off)
        return buf


class DemoChain(NamedTuple):
    """The chain ``build_demo_chain`` made (sizes in bytes)."""
    template: str
    overlay: str
    virtual_size: int
    template_data: int
    template_extents: int
    overlay_data: int
    overlay_writes: int
    overlay_zeroed: int
def build_demo_chain(directory: str, data_size: int, seed: int = 2024) -> DemoChain:
    """A qcow2 template with ``data_size`` bytes of varied data in extents of varied sizes
    spread over a disk four times as large, and a qcow2 overlay on it with writes of its
    own (unaligned ones, and zeroed ranges over the template's data)."""
    rng = random.Random(seed)
    pools = _Pools(rng)
    data_size = max(_STAMP_EVERY, data_size - data_size % 4096)
    vsize = max(16 * MiB, -(-4 * data_size // (64 * MiB)) * 64 * MiB)
    template = os.path.join(directory, "template.qcow2")
    overlay = os.path.join(directory, "vm.qcow2")
    for p in (template, overlay):
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists: give an empty directory or remove it")

    # extents: lengths from 4 KiB to 16 MiB (capped by the data size), placed in order
    # with random gaps between them
    biggest = max(64 << 10, min(16 * MiB, data_size // 8))
    lengths: List[int] = []
    left = data_size
    while left > 0:
        n = min(left, rng.choice((4 << 10, 60 << 10, 256 << 10, 1 * MiB, 3 * MiB, biggest)))
        n = min(left, max(4096, n - rng.randrange(0, n // 2 + 1) // 4096 * 4096))
        lengths.append(n)
        left -= n
    slack = (vsize - data_size) // 4096
    cuts = sorted(rng.randrange(slack + 1) * 4096 for _ in lengths)
    blockpull.create(template, vsize)
    pos = 0
    with blockpull.open(template) as img:
        for n, gap in zip(lengths, cuts):
            start = pos + gap
            done = 0
            while done < n:   # chunks of up to 4 MiB keep memory small
                k = min(4 * MiB, n - done)
                img.write(start + done, pools.fill(rng, start + done, k))
                done += k
            pos += n
        img.flush()

    blockpull.create(overlay, 0, backing=os.path.basename(template), backing_format="qcow2")
    written = writes = zeroed = 0
    with blockpull.open(overlay) as img:
        budget = max(64 << 10, data_size // 16)
        while written < budget:
            n = rng.choice((512, 4096, 10_000, 65536, 200_000, 1 * MiB))
            off = rng.randrange(0, vsize - n)
            img.write(off, pools.fill(rng, off, n))
            written += n
            writes += 1
        starts = list(zip(lengths, cuts))
        pos = 0
        for i, (n, gap) in enumerate(starts):
            if i % 9 == 4 and n >= 128 << 10:   # zero part of some template extents
                zn = n // 2
                img.write_zeroes(pos + gap + (64 << 10), zn)
                zeroed += zn
            pos += n
        img.flush()
    return DemoChain(template, overlay, vsize, data_size, len(lengths), written, writes, zeroed)


def content_digest(img: Image) -> str:
    """SHA-256 (64 hex digits) of the whole virtual disk ``img`` reads through its chain,
    byte for byte from offset 0 to its virtual size: the digest ``sha256sum`` prints for
    the raw disk (``qemu-img convert -O raw IMAGE disk.raw; sha256sum disk.raw``).

    Ranges the map says read as zeros are hashed as zeros without being read.
    """
    digest = hashlib.sha256()
    buf = bytearray(_DIGEST_BLOCK)
    view = memoryview(buf)
    zeros = memoryview(bytes(_DIGEST_BLOCK))
    for e in img.map():
        pos, end = e.start, e.start + e.length
        while pos < end:
            n = min(_DIGEST_BLOCK, end - pos)
            if e.data or not e.zero:
                img.readinto(pos, view[:n])
                digest.update(view[:n])
            else:
                digest.update(zeros[:n])
            pos += n
    return digest.hexdigest()


# ---- the command --------------------------------------------------------------------------


def _chain_text(img: Image) -> str:
    return " -> ".join(f"{os.path.basename(c.path)} ({c.format})" for c in img.chain) + \
        ("" if len(img.chain) > 1 else ", no backing file")


def cmd_demo(args: argparse.Namespace) -> int:
    """``blockpull demo``: build a sample chain, pull it, verify it, summarise."""
    if args.directory is not None:
        directory = kernel_abspath(args.directory)
        os.makedirs(directory, exist_ok=True)
        remove = False
    else:
        directory = tempfile.mkdtemp(prefix="blockpull-demo-")
        remove = not args.keep
    try:
        return _demo(args, directory, remove)
    finally:
        if remove:
            shutil.rmtree(directory, ignore_errors=True)


def _pull(args: argparse.Namespace, built: DemoChain, say: Callable[[str], None]
          ) -> Tuple[PullInfo, str, str, Optional[int]]:
    """Pull the demo's overlay: returns its progress at the end, the chain before, the
    SHA-256 of its content, and the signal that aborted the pull (None: it completed);
    raises OperationFailed if the pull failed."""
    show_bar = want_bar(args, args.output == "json")
    with blockpull.open(built.overlay) as img:
        before = _chain_text(img)
        want = content_digest(img)
        say(f"content of the chain: sha256 {want}")
        limit = f"at up to {format_size(args.bandwidth)}/s" if args.bandwidth else "unlimited"
        say(f"pulling vm.qcow2 {limit} (Ctrl-C aborts cleanly)")
        progress = Progress(show_bar, False, "vm.qcow2")
        job, signum = run_pull(img, progress, bandwidth=args.bandwidth)
        info = job.info()
        progress.finish(info, job.status, job.error, img.backing_name)
    if signum is not None and job.status == "cancelled":
        print(f"{PROG}: demo aborted at {format_size(info.cur)} of {format_size(info.end)}",
              file=sys.stderr)
        return info, before, want, signum
    if job.status != "completed":
        raise OperationFailed(f"demo pull {job.status}: {job.error}")
    return info, before, want, None


def _verify(built: DemoChain, directory: str,
            want: str) -> Tuple[str, str, "blockpull.CheckResult"]:
    """Check that the pulled overlay reads ``want`` (its SHA-256) with no backing file,
    and that ``blockpull.check`` finds it clean: returns the chain after, the SHA-256
    and the check's result; raises OperationFailed."""
    with blockpull.open(built.overlay, readonly=True) as img:
        after = _chain_text(img)
        got = content_digest(img)
        standalone = img.backing is None and len(img.chain) == 1
    if got != want or not standalone:
        raise OperationFailed(
            f"demo verification failed: {built.overlay} "
            + ("reads differently from the chain it came from" if got != want
               else "still has a backing file")
            + f" (kept in {directory}; please report this)")
    checked = blockpull.check(built.overlay)
    if checked.exit_code != 0:
        raise OperationFailed(f"demo: check of {built.overlay} found problems: "
                              f"{checked.corruptions} corruptions, {checked.leaks} leaks")
    return after, got, checked


def _demo(args: argparse.Namespace, directory: str, removing: bool) -> int:
    json_out = args.output == "json"

    def say(text: str = "") -> None:
        if not json_out:
            print(text, flush=True)

    say(f"blockpull demo in {directory}")
    t0 = time.monotonic()
    built = build_demo_chain(directory, args.size)
    t_build = time.monotonic() - t0
    say(f"built a chain with blockpull's own create and write in {t_build:.1f} s:")
    say(f"  template.qcow2  {format_size(built.virtual_size)} disk, "
        f"{format_size(built.template_data)} of data in {built.template_extents} extents "
        f"(random, text and record-like)")
    say(f"  vm.qcow2        overlay on template.qcow2 with {built.overlay_writes} writes "
        f"of its own ({format_size(built.overlay_data)}), {format_size(built.overlay_zeroed)} "
        f"zeroed")
    info, before, want, signum = _pull(args, built, say)
    if signum is not None:
        return 128 + signum
    after, got, checked = _verify(built, directory, want)
    rate = info.copied_bytes / info.elapsed / MiB if info.elapsed > 0 else 0.0
    if json_out:
        emit_json({"directory": directory, "kept": not removing,
                   "virtual_size": built.virtual_size, "template_data": built.template_data,
                   "overlay_data": built.overlay_data, "before": before, "after": after,
                   "copied_bytes": info.copied_bytes, "zeroed_bytes": info.zeroed_bytes,
                   "seconds": round(info.elapsed, 3), "mib_per_s": round(rate, 1),
                   "bandwidth": args.bandwidth, "digest": got, "verified": True,
                   "check_clean": checked.exit_code == 0},
                  sys.stdout)
        return EXIT_OK
    say(f"before: {before}")
    say(f"after:  {after}")
    say(f"copied {format_size(info.copied_bytes)} in {info.elapsed:.1f} s ({rate:.1f} MiB/s)")
    say(f"verified: vm.qcow2 reads exactly what the chain read (sha256 {got}) "
        f"and has no backing file; check finds no errors")
    if removing:
        say(f"removed {directory} (--keep keeps it)")
    else:
        say(f"kept {directory}; try: blockpull info {built.overlay}")
        say(f"the sha256 is that of the raw disk: qemu-img convert -O raw "
            f"{built.overlay} vm.raw && sha256sum vm.raw")
    return EXIT_OK
