"""The demo's digest is the SHA-256 of the raw virtual disk, as sha256sum prints it for
the disk qemu-img converts to raw."""
import hashlib
import json
import re
import subprocess
import sys

import blockpull
from blockpull.cli.demo import build_demo_chain, content_digest
from relhelp import child_env

MiB = 1 << 20


def raw_sha256(qemu, image, tmp_path):
    out = tmp_path / "disk.raw"
    qemu.img("convert", "-O", "raw", str(image), str(out))
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    out.unlink()
    return h.hexdigest()


def test_content_digest_is_sha256_of_the_raw_disk(tmp_path, qemu):
    built = build_demo_chain(str(tmp_path), 3 * MiB)
    want = raw_sha256(qemu, built.overlay, tmp_path)
    with blockpull.open(built.overlay, readonly=True) as img:
        assert content_digest(img) == want


def test_digest_of_a_size_not_a_multiple_of_the_block(tmp_path, qemu):
    p = qemu.create(tmp_path / "odd.qcow2", 3 * MiB + 512)
    qemu.io(p, "write -P 0x5c 1M 4k", "write -P 0x5d 3M 512")
    with blockpull.open(p, readonly=True) as img:
        assert content_digest(img) == raw_sha256(qemu, p, tmp_path)


def test_demo_prints_the_sha256_of_the_raw_disk(tmp_path, qemu):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "blockpull", "demo", str(out), "--size", "2M",
                        "--bandwidth", "0"], capture_output=True, text=True, env=child_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    want = raw_sha256(qemu, out / "vm.qcow2", tmp_path)
    printed = re.findall(r"sha256 ([0-9a-f]+)", r.stdout)
    assert printed == [want, want], r.stdout
    assert "sha256sum" in r.stdout
    r = subprocess.run([sys.executable, "-m", "blockpull", "demo", str(tmp_path / "j"),
                        "--size", "1M", "--bandwidth", "0", "--output", "json"],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["digest"] == raw_sha256(qemu, tmp_path / "j" / "vm.qcow2",
                                                        tmp_path)
