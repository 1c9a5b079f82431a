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


def test_external_data_file_is_check_incomplete_not_corrupt(tmp_path, qemu):
    # an absolute name: qemu-img and qemu-io take a relative one from their working
    # directory, which would leave the data file in the directory the suite runs from
    qemu.img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 't.data'}",
             str(tmp_path / "t.qcow2"), "8M")
    qemu.io(str(tmp_path / "t.qcow2"), "write -P 7 0 1M")
    assert qemu.check(tmp_path / "t.qcow2") == 0
    before = _digest(tmp_path / "t.qcow2")
    for args in (["check", "t.qcow2"], ["check", "-r", "leaks", "t.qcow2"],
                 ["check", "--output", "json", "t.qcow2"]):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.returncode, r.stdout, r.stderr)
        assert "check incomplete" in r.stderr and "data file" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
    assert _digest(tmp_path / "t.qcow2") == before
    qemu.assert_clean(tmp_path / "t.qcow2")


def test_not_an_image_is_check_incomplete(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image\n" * 100)
    r = _cli("check", "notes.txt", cwd=tmp_path)
    assert r.returncode == 1 and "check incomplete" in r.stderr, (r.returncode, r.stderr)
