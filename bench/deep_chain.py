"""Time and memory of a deep backing chain: open, map and pull (not a test).

    python bench/deep_chain.py DIR [--depth 200] [--format qcow2|qed] [--size-mib 1024]
                                    [--layer-kib 1024]

Builds DEPTH images in DIR (removed and made again), image i holding LAYER-KIB of data at
its own offset, each written alone and linked to the one below. A fresh process then
opens the top, maps it, pulls the whole chain into it and prints the seconds and the
resident memory (RSS, MiB) after each step, and the peak RSS. ``qemu-img compare``
checks the pulled top against the chain when qemu-img is installed.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import blockpull  # noqa: E402

MiB = 1 << 20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def build(d: str, depth: int, fmt: str, size: int, layer: int) -> str:
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    prev = None
    path = ""
    for i in range(depth):
        path = os.path.join(d, f"l{i}.{fmt}")
        blockpull.create(path, size, fmt=fmt, backing=prev,
                         backing_format=fmt if prev is not None else None)
        with blockpull.open(path) as img:
            img.write(i * layer % (size - layer), bytes([i % 255 + 1]) * layer)
        prev = os.path.basename(path)
    return path


def measure(top: str) -> None:
    out = [f"start: rss {rss_mib():.1f} MiB"]
    t0 = time.monotonic()
    img = blockpull.open(top)
    out.append(f"open {len(img.chain)} images: {time.monotonic() - t0:.3f} s, "
               f"rss {rss_mib():.1f} MiB")
    t0 = time.monotonic()
    extents = img.map()
    out.append(f"map ({len(extents)} extents): {time.monotonic() - t0:.3f} s, "
               f"rss {rss_mib():.1f} MiB")
    t0 = time.monotonic()
    info = img.pull().result(timeout=3600)
    dt = time.monotonic() - t0
    out.append(f"pull ({info.copied_bytes / MiB:.0f} MiB copied): {dt:.3f} s, "
               f"rss {rss_mib():.1f} MiB")
    img.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.append(f"peak rss {peak:.1f} MiB")
    print("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--depth", type=int, default=200)
    ap.add_argument("--format", default="qcow2", choices=("qcow2", "qed"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--layer-kib", type=int, default=1024)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        measure(a.measure)
        return
    t0 = time.monotonic()
    top = build(a.dir, a.depth, a.format, a.size_mib * MiB, a.layer_kib << 10)
    print(f"built {a.depth} {a.format} images in {time.monotonic() - t0:.1f} s")
    want = os.path.join(a.dir, "chain.raw")
    qemu = shutil.which("qemu-img")
    if qemu:
        subprocess.run([qemu, "convert", "-O", "raw", top, want], check=True)
    subprocess.run([sys.executable, os.path.abspath(__file__), a.dir, "--measure", top],
                   check=True)
    if qemu:
        r = subprocess.run([qemu, "compare", "-F", "raw", top, want])
        print("qemu-img compare:", "identical" if r.returncode == 0 else "DIFFERENT")
        os.unlink(want)


if __name__ == "__main__":
    main()
