"""A real VM boots from the served overlay while blockpull pulls it.

The guest (TCG, no KVM needed) is the Debian cloud kernel with an initramfs the test
builds: busybox, an /init script and the kernel's virtio modules. /init reads the disk
(its checksum must equal the chain's), writes a block, syncs and powers off, while the
pull runs under a bandwidth limit. Afterwards the guest's write is in the image, the image
stands alone, and `qemu-img check` is clean. The same guest against qemu-storage-daemon's
export of the same chain shows the harness is right.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import stat
import subprocess
import time

import pytest

import blockpull

MiB = 1 << 20
DISK = 32 * MiB
GUEST_OFFSET = 8 * MiB
GUEST_BLOCK = b"written by the guest over NBD\n".ljust(4096, b"g")
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk")
PACKAGES = "qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio"

INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
exec </dev/ttyS0 >/dev/ttyS0 2>&1
for m in %(modules)s; do $B insmod /lib/$m.ko || echo "INSMOD FAILED $m"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do $B usleep 50000; i=$((i+1)); done
echo "SUM=$($B dd if=/dev/vda bs=1M count=%(mib)d iflag=direct 2>/dev/null | $B sha256sum)"
$B dd if=/block.bin of=/dev/vda bs=4096 seek=%(seek)d count=1 oflag=direct conv=fsync 2>/dev/null
$B sync
echo "GUEST DONE"
$B poweroff -f
"""


def _kernel():
    ks = sorted(glob.glob("/boot/vmlinuz-*"))
    return ks[-1] if ks else None


@pytest.fixture
def vmtools(qemu):
    kernel = _kernel()
    missing = [t for t in ("qemu-system-x86_64", "busybox", "cpio") if not shutil.which(t)]
    if kernel is None:
        missing.append("a kernel in /boot")
    if missing:
        msg = f"{', '.join(missing)} missing: apt-get install {PACKAGES}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    version = os.path.basename(kernel)[len("vmlinuz-"):]
    mods = {}
    for m in MODULES:
        found = glob.glob(f"/lib/modules/{version}/kernel/**/{m}.ko", recursive=True)
        if not found:
            pytest.fail(f"module {m}.ko of {version} not found (apt-get install {PACKAGES})")
        mods[m] = found[0]
    return qemu, kernel, mods


def build_initrd(d, mods):
    root = os.path.join(d, "initrd")
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "lib"))
    shutil.copy(shutil.which("busybox"), os.path.join(root, "bin", "busybox"))
    for m, path in mods.items():
        shutil.copy(path, os.path.join(root, "lib", m + ".ko"))
    with open(os.path.join(root, "block.bin"), "wb") as f:
        f.write(GUEST_BLOCK)
    init = os.path.join(root, "init")
    with open(init, "w") as f:
        f.write(INIT % {"modules": " ".join(MODULES), "mib": DISK // MiB,
                        "seek": GUEST_OFFSET // 4096})
    os.chmod(init, 0o755)
    out = os.path.join(d, "initrd.cpio")
    files = subprocess.run("find . | sort", shell=True, cwd=root, capture_output=True,
                           check=True).stdout
    with open(out, "wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=files, cwd=root,
                       stdout=f, check=True)
    return out


def boot(kernel, initrd, uri):
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot",
           "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 panic=-1 quiet",
           "-drive", f"file={uri},format=raw,if=virtio,cache=none"]
    r = subprocess.run(cmd, capture_output=True, timeout=300)
    console = r.stdout.decode("utf-8", "replace")
    assert "GUEST DONE" in console, console[-4000:] + r.stderr.decode()[-2000:]
    assert "INSMOD FAILED" not in console, console[-4000:]
    m = re.search(r"SUM=([0-9a-f]{64})", console)
    assert m, console[-4000:]
    return m.group(1)


def make_chain(qemu, d):
    """A template of random data (a misplaced block shows) with holes, and an overlay
    with a write of its own; returns (top, pristine copy of top, the chain's raw bytes)."""
    img = bytearray(DISK)
    for off, n in ((0, 6 * MiB), (12 * MiB, 4 * MiB), (24 * MiB, 6 * MiB)):
        img[off:off + n] = os.urandom(n)
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.write(img)
    base = os.path.join(d, "base.qcow2")
    qemu.img("convert", "-f", "raw", "-O", "qcow2", os.path.join(d, "base.raw"), base)
    top = qemu.create(os.path.join(d, "top.qcow2"), DISK, backing="base.qcow2")
    qemu.io(top, "write -P 9 13M 64k")
    ref = os.path.join(d, "ref.qcow2")
    shutil.copy(top, ref)
    raw = qemu.to_raw(ref, os.path.join(d, "ref.raw"))
    return top, ref, raw


@pytest.mark.parametrize("peer", ["blockpull", "qemu-storage-daemon"])
def test_vm_boots_from_the_export_while_it_is_pulled(tmp_path, vmtools, peer):
    qemu, kernel, mods = vmtools
    d = str(tmp_path)
    top, ref, raw = make_chain(qemu, d)
    initrd = build_initrd(d, mods)
    want = hashlib.sha256(raw).hexdigest()
    if peer == "blockpull":
        # the provisioning story: the guest boots at once from the export, what it
        # reads is copied on read, the pull streams the rest at 1 MiB/s
        with blockpull.serve(top, pull=True, bandwidth="1M") as srv:
            job = srv.job
            got = boot(kernel, initrd, srv.uri)
            # the guest read the whole disk (~26 MiB) far faster than 1 MiB/s: its reads
            # copied most of it, and the pull, which pays only for what it copies, ends
            # without its speed raised
            info = job.result(timeout=120)
            assert 0 < info.copied_bytes < DISK, info
        assert "backing-filename" not in qemu.info(top)
        qemu.assert_clean(top)
    else:
        if not shutil.which("qemu-storage-daemon"):
            pytest.fail("qemu-storage-daemon missing: apt-get install qemu-system-common")
        sock = os.path.join(d, "qsd.sock")
        qsd = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={top},node-name=file",
             "--blockdev", "driver=qcow2,file=file,node-name=top",
             "--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", "type=nbd,id=e,node-name=top,writable=on"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for _ in range(200):
                if os.path.exists(sock) and stat.S_ISSOCK(os.stat(sock).st_mode):
                    break
                time.sleep(0.05)
            got = boot(kernel, initrd, f"nbd+unix:///top?socket={sock}")
        finally:
            qsd.terminate()
            qsd.wait(30)
        qemu.assert_clean(top)
    assert got == want
    # the guest's block is in the image, everything else reads as the chain did
    out = qemu.to_raw(top, os.path.join(d, "after.raw"))
    expect = raw[:GUEST_OFFSET] + GUEST_BLOCK + raw[GUEST_OFFSET + len(GUEST_BLOCK):]
    assert out == expect
