"""``blockpull demo --serve``: a small VM boots from the served overlay while it is pulled.

The guest is the host's kernel (Debian's cloud kernel works without KVM, under TCG) with
an initramfs built here: busybox, an /init script and the kernel's virtio modules. /init
reads the whole disk and prints its checksum (which must equal the chain's), writes a
block, syncs and powers off, while the pull runs in the background under a bandwidth
limit. Both show: the guest's console on stdout, the pull's progress on stderr.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import blockpull
from blockpull.cli.common import EXIT_OK, OperationFailed, UsageError, want_bar
from blockpull.cli.demo import DEMO_BANDWIDTH, DEMO_DATA, DemoChain, build_demo_chain
from blockpull.cli.output import Progress, emit_json
from blockpull.units import format_size

__all__ = ["add_parser", "cmd_demo_serve", "Missing", "find_guest", "build_initrd", "md5_of"]

PACKAGES = "qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio"
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk")
MiB = 1 << 20
#: where the guest writes its block, bytes into the disk
GUEST_OFFSET = 1 * MiB
GUEST_BLOCK = b"hello from the guest, written over NBD while the disk was pulled\n".ljust(
    4096, b".")
#: the demo's data and pull speed when --serve is given without --size / --bandwidth
SERVE_DATA = 32 * MiB
SERVE_BANDWIDTH = 4 * MiB

_INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
exec </dev/ttyS0 >/dev/ttyS0 2>&1
echo "guest: up, loading virtio"
for m in %(modules)s; do $B insmod /lib/$m.ko || echo "guest: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do $B usleep 50000; i=$((i+1)); done
echo "guest: /dev/vda is $($B blockdev --getsize64 /dev/vda) bytes; reading all of it"
echo "guest: MD5=$($B md5sum < /dev/vda | $B cut -d' ' -f1)"
echo "guest: writing a block at %(offset)d"
$B dd if=/block.bin of=/dev/vda bs=4096 seek=%(seek)d count=1 conv=fsync 2>/dev/null
$B sync
echo "guest: done, powering off"
$B poweroff -f
"""


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``--serve`` to the ``demo`` subcommand (registered before this)."""
    demo = sub.choices["demo"]
    demo.add_argument("--serve", action="store_true",
                      help="serve the overlay over NBD and boot a small VM from it "
                           "while it is pulled (needs qemu-system-x86_64, a kernel in "
                           "/boot, busybox and cpio); defaults to 32M of data at 4M/s")
    plain = demo.get_default("func")

    def demo_func(args: argparse.Namespace) -> int:
        if args.serve:
            return cmd_demo_serve(args)
        return int(plain(args))
    demo.set_defaults(func=demo_func)


class Missing(Exception):
    """What the VM demo needs and the host lacks (the message says what to install)."""


def find_guest() -> Tuple[str, Dict[str, str], str]:
    """(kernel, {module: path}, busybox) of the host; raises Missing."""
    missing = [t for t in ("qemu-system-x86_64", "busybox", "cpio") if not shutil.which(t)]
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels:
        missing.append("a kernel in /boot")
    if missing:
        raise Missing(f"demo --serve needs {', '.join(missing)}: apt-get install {PACKAGES}")
    for kernel in reversed(kernels):
        version = os.path.basename(kernel)[len("vmlinuz-"):]
        mods = {}
        for m in MODULES:
            found = glob.glob(f"/lib/modules/{version}/kernel/**/{m}.ko", recursive=True)
            if found:
                mods[m] = found[0]
        if len(mods) == len(MODULES):
            return kernel, mods, shutil.which("busybox") or "busybox"
    raise Missing(f"no kernel in /boot has the virtio modules as plain .ko files: "
                  f"apt-get install {PACKAGES}")


def build_initrd(directory: str, mods: Dict[str, str], busybox: str) -> str:
    """The guest's initramfs (cpio newc) in ``directory``; returns its path."""
    root = tempfile.mkdtemp(prefix="initrd-", dir=directory)
    try:
        os.makedirs(os.path.join(root, "bin"))
        os.makedirs(os.path.join(root, "lib"))
        shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
        for m, path in mods.items():
            shutil.copy(path, os.path.join(root, "lib", m + ".ko"))
        with open(os.path.join(root, "block.bin"), "wb") as f:
            f.write(GUEST_BLOCK)
        init = os.path.join(root, "init")
        with open(init, "w") as f:
            f.write(_INIT % {"modules": " ".join(MODULES), "offset": GUEST_OFFSET,
                             "seek": GUEST_OFFSET // 4096})
        os.chmod(init, 0o755)
        names: List[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for n in sorted(dirnames) + sorted(filenames):
                names.append(os.path.normpath(os.path.join(rel, n)))
        out = os.path.join(directory, "initrd.cpio")
        with open(out, "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, stdout=f,
                           input=("\n".join(sorted(names)) + "\n").encode(), check=True)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def md5_of(path: str, backing_format: Optional[str] = None) -> str:
    """MD5 of everything the image reads through its chain (what the guest computes)."""
    h = hashlib.md5()
    with blockpull.open(path, readonly=True, backing_format=backing_format) as img:
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        for off in range(0, img.size, len(buf)):
            n = min(len(buf), img.size - off)
            img.readinto(off, view[:n])
            h.update(view[:n])
    return h.hexdigest()


def _boot(server: Any, kernel: str, initrd: str, progress: Progress,
          say: Callable[[str, str], None]) -> Tuple[List[str], bool]:
    """Boot the guest from ``server``'s export and show the pull until the guest powers
    off; then let the pull finish unlimited. Returns the guest's console lines and
    whether the pull was still running when the guest was done."""
    job = server.job
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic",
           "-no-reboot", "-kernel", kernel, "-initrd", initrd,
           "-append", "console=ttyS0 panic=-1 quiet",
           "-drive", f"file={server.uri},format=raw,if=virtio,cache=none"]
    vm = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console: List[str] = []

    def pump() -> None:
        assert vm.stdout is not None
        for raw in vm.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            console.append(line)
            if "guest:" in line:
                say(line[line.index("guest:"):], "guest")
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    progress.start(job.info())
    while vm.poll() is None:
        progress.update(job.info())
        time.sleep(progress.interval)
    reader.join(10)
    overlapped = not job.done()
    job.set_speed(0)
    info = job.result()
    progress.finish(info, job.status, job.error, server.image.backing_name)
    return console, overlapped


def _verify(built: DemoChain, directory: str, console: List[str], want: str) -> None:
    """The guest read ``want`` (MD5), its block is in the overlay, which stands alone and
    checks clean; raises OperationFailed."""
    m = re.search(r"MD5=([0-9a-f]{32})", "\n".join(console))
    if m is None:
        raise OperationFailed("the guest did not report its checksum; its console:\n"
                              + "\n".join(console[-20:]))
    if m.group(1) != want:
        raise OperationFailed(f"the guest read {m.group(1)}, the chain holds {want}")
    with blockpull.open(built.overlay, readonly=True) as img:
        standalone = img.backing is None
        block_ok = img.read(GUEST_OFFSET, len(GUEST_BLOCK)) == GUEST_BLOCK
    checked = blockpull.check(built.overlay)
    if not (standalone and block_ok and checked.exit_code == 0):
        raise OperationFailed(f"demo verification failed (kept in {directory})")


def cmd_demo_serve(args: argparse.Namespace) -> int:
    """Build the demo chain, serve the overlay with a pull, boot a VM from it, verify."""
    try:
        kernel, mods, busybox = find_guest()
    except Missing as exc:
        raise UsageError(str(exc)) from None
    json_out = args.output == "json"
    size = SERVE_DATA if args.size == DEMO_DATA else args.size
    bandwidth = SERVE_BANDWIDTH if args.bandwidth == DEMO_BANDWIDTH else args.bandwidth
    if args.directory is not None:
        directory = os.path.abspath(args.directory)
        os.makedirs(directory, exist_ok=True)
        remove = False
    else:
        directory = tempfile.mkdtemp(prefix="blockpull-demo-")
        remove = not args.keep
    lock = threading.Lock()

    def say(text: str, kind: str = "demo") -> None:
        with lock:
            if json_out:
                emit_json({"type": kind, "line": text}, sys.stdout)
            else:
                print(text, flush=True)

    try:
        built = build_demo_chain(directory, size)
        say(f"built {os.path.basename(built.template)} ({format_size(built.template_data)} "
            f"of data on a {format_size(built.virtual_size)} disk) and the overlay "
            f"{os.path.basename(built.overlay)} in {directory}")
        want = md5_of(built.overlay)
        initrd = build_initrd(directory, mods, busybox)
        progress = Progress(want_bar(args, json_out), json_out, os.path.basename(built.overlay))
        with blockpull.serve(built.overlay, pull=True, bandwidth=bandwidth) as server:
            say(f"serving {server.uri}; pulling at up to {format_size(bandwidth)}/s; "
                f"booting {os.path.basename(kernel)} from it (TCG)")
            console, overlapped = _boot(server, kernel, initrd, progress, say)
        _verify(built, directory, console, want)
        say(f"verified: the guest read exactly the chain's content (md5 {want}), its block "
            f"is in {os.path.basename(built.overlay)}, which has no backing file now and "
            f"checks clean" + ("; the pull ran all the while the guest did" if overlapped
                               else ""))
        return EXIT_OK
    finally:
        if remove:
            shutil.rmtree(directory, ignore_errors=True)
