"""The README's API tour runs as written, and what it leaves behind is what it says."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import blockpull
from relhelp import child_env

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_api_tour_runs_as_written(tmp_path, qemu):
    blocks = python_blocks()
    assert len(blocks) >= 5, "the README's API tour has lost its examples"
    script = tmp_path / "tour.py"
    script.write_text("\n".join(blocks))
    env = child_env()
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ChainEntry" in r.stdout and "Extent" in r.stdout
    template = str(tmp_path / "template.qcow2")
    for name in ("vm.qcow2", "vm2.qcow2", "vm3.qcow2", "vm4.qcow2", "vm9a.qcow2", "vm9b.qcow2"):
        path = str(tmp_path / name)
        qemu.assert_clean(path)
        assert "backing-filename" not in qemu.info(path), name
        if name != "vm.qcow2":   # vm.qcow2 also holds the tour's guest write
            assert qemu.compare(path, template, "qcow2", "qcow2"), name
    with blockpull.open(str(tmp_path / "vm.qcow2"), readonly=True) as img:
        msg = b"guest writes keep working while the pull runs"
        assert img.read(4096, len(msg)) == msg
        assert img.read(300 << 20, 1 << 20) == bytes(range(256)) * 4096
    # vm5 was aborted (or had finished): either way it reads as the template
    qemu.assert_clean(str(tmp_path / "vm5.qcow2"))
    assert qemu.compare(str(tmp_path / "vm5.qcow2"), template, "qcow2", "qcow2")
    # the serving example: the client's write landed, the pull left vm6 standing alone
    vm6 = str(tmp_path / "vm6.qcow2")
    qemu.assert_clean(vm6)
    assert "backing-filename" not in qemu.info(vm6)
    with blockpull.open(vm6, readonly=True) as img:
        assert img.read(0, 65536) == b"\x07" * 65536
        assert img.read(300 << 20, 1 << 20) == bytes(range(256)) * 4096
    # the QMP examples: QEMU's pull of vm7, blockpull's of vm8 steered by the same call
    assert "QEMU's pull: completed" in r.stdout
    for name in ("vm7.qcow2", "vm8.qcow2"):
        path = str(tmp_path / name)
        qemu.assert_clean(path)
        assert "backing-filename" not in qemu.info(path), name
        assert qemu.compare(path, template, "qcow2", "qcow2"), name
