"""qemu-storage-daemon holding an image chain, with QMP monitors, for the QMP tests."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from typing import List, Sequence

import pytest


def need_qsd() -> None:
    """Missing qemu-storage-daemon or qemu.qmp fails under CI, skips elsewhere."""
    missing = []
    if not shutil.which("qemu-storage-daemon"):
        missing.append("qemu-storage-daemon (apt-get install qemu-system-common)")
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        missing.append("qemu.qmp (pip install 'blockpull[qmp]')")
    if missing:
        msg = "needed: " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


class Qsd:
    """A qemu-storage-daemon with ``monitors`` QMP sockets (``self.sockets``)."""

    def __init__(self, workdir: str, blockdevs: Sequence[str], monitors: int = 2) -> None:
        self.sockets: List[str] = [os.path.join(workdir, f"qmp{i}.sock")
                                   for i in range(monitors)]
        args = ["qemu-storage-daemon"]
        for i, s in enumerate(self.sockets):
            args += ["--chardev", f"socket,path={s},server=on,wait=off,id=m{i}",
                     "--monitor", f"chardev=m{i}"]
        for b in blockdevs:
            args += ["--blockdev", b]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu-storage-daemon exited: {self.proc.stdout.read()!r}")
            if all(self._listening(s) for s in self.sockets):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError("qemu-storage-daemon did not listen within 20 s")
            time.sleep(0.02)

    @staticmethod
    def _listening(path: str) -> bool:
        if not os.path.exists(path):
            return False
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
        except OSError:
            return False
        finally:
            s.close()
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def qcow2_node(path: str, node: str = "top") -> str:
    return json.dumps({"driver": "qcow2", "node-name": node,
                       "file": {"driver": "file", "filename": str(path)}})
