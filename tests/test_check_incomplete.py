"""`blockpull check` never calls an image corrupt (exit 2) because it could not check it."""
from __future__ import annotations

import hashlib
import subprocess
import sys

from relhelp import child_env


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockpull", *args], capture_output=True,
                          text=True, cwd=cwd, env=child_env())


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_external_data_file_is_checked_not_corrupt(tmp_path, qemu):
    # an absolute name: QEMU resolves a relative data file name in its working directory.
    # Data files are checked now (metadata refcounts; each data entry at its guest
    # offset): clean, as qemu-img check says, and nothing written
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 't.data'}",
             str(tmp_path / "t.qcow2"), "8M")
    qemu.io(str(tmp_path / "t.qcow2"), "write -P 7 0 1M")
    assert qemu.check(tmp_path / "t.qcow2") == 0
    before = _digest(tmp_path / "t.qcow2")
    for args in (["check", "t.qcow2"], ["check", "-r", "leaks", "t.qcow2"],
                 ["check", "--output", "json", "t.qcow2"]):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        assert r.stderr == "", r.stderr
    r = _cli("check", "t.qcow2", cwd=tmp_path)
    assert "16/128 = 12.50% allocated" in r.stdout, r.stdout
    assert _digest(tmp_path / "t.qcow2") == before
    qemu.assert_clean(tmp_path / "t.qcow2")


def test_data_file_bit_without_a_name_is_check_incomplete(tmp_path, qemu):
    # incompatible bit 2 set with no data file name recorded: not understood here (QEMU
    # opens it only when told the data file), so exit 1 "check incomplete", never 2
    qemu.img("create", "-q", "-f", "qcow2", str(tmp_path / "t.qcow2"), "8M")
    with open(tmp_path / "t.qcow2", "r+b") as f:
        f.seek(72)
        bits = int.from_bytes(f.read(8), "big")
        f.seek(72)
        f.write((bits | 4).to_bytes(8, "big"))
    r = _cli("check", "t.qcow2", cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "check incomplete" in r.stderr and "data file" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_not_an_image_is_check_incomplete(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image\n" * 100)
    r = _cli("check", "notes.txt", cwd=tmp_path)
    assert r.returncode == 1 and "check incomplete" in r.stderr, (r.returncode, r.stderr)
