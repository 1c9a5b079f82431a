"""Shared fixtures: QEMU's tools as the oracle, and helpers that build real chains."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import List, Optional, Sequence

import pytest

QEMU_TOOLS = ("qemu-img", "qemu-io")


def have_qemu() -> bool:
    return all(shutil.which(t) for t in QEMU_TOOLS)


def pytest_configure(config):
    """BLOCKPULL_SOAK=1 runs the long reliability soak (tests marked slow) as well."""
    if os.environ.get("BLOCKPULL_SOAK", "") not in ("", "0") and \
            config.option.markexpr == "not slow":
        config.option.markexpr = ""


class Qemu:
    """Thin wrappers over qemu-img and qemu-io that raise on failure."""

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), capture_output=True, text=True)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def img(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("qemu-img", *args, check=check)

    def io(self, path: str, *cmds: str, fmt: Optional[str] = None) -> None:
        args: List[str] = ["qemu-io"]
        if fmt:
            args += ["-f", fmt]
        for c in cmds:
            args += ["-c", c]
        r = self.run(*args, path)
        if "error" in r.stdout.lower() or "failed" in r.stdout.lower():
            raise AssertionError(f"qemu-io {cmds} on {path}: {r.stdout}")

    def create(self, path: str, size: int, fmt: str = "qcow2", backing: Optional[str] = None,
               backing_fmt: Optional[str] = None, opts: Sequence[str] = ()) -> str:
        args = ["create", "-q", "-f", fmt]
        if backing:
            args += ["-b", backing, "-F", backing_fmt or "qcow2"]
        for o in opts:
            args += ["-o", o]
        self.img(*args, str(path), str(size))
        return str(path)

    def check(self, path: str, fmt: Optional[str] = None) -> int:
        args = ["check"] + (["-f", fmt] if fmt else []) + [str(path)]
        return self.img(*args, check=False).returncode

    def assert_clean(self, path: str, fmt: Optional[str] = None) -> None:
        args = ["check"] + (["-f", fmt] if fmt else []) + [str(path)]
        r = self.img(*args, check=False)
        assert r.returncode == 0, f"qemu-img check {path}: {r.returncode}\n{r.stdout}{r.stderr}"

    def compare(self, a: str, b: str, fa: Optional[str] = None, fb: Optional[str] = None) -> bool:
        args = ["compare"]
        if fa:
            args += ["-f", fa]
        if fb:
            args += ["-F", fb]
        r = self.img(*args, str(a), str(b), check=False)
        if r.returncode not in (0, 1):
            raise AssertionError(f"qemu-img compare: {r.stdout}{r.stderr}")
        return r.returncode == 0

    def to_raw(self, path: str, out: str) -> bytes:
        self.img("convert", "-O", "raw", str(path), str(out))
        with open(out, "rb") as f:
            return f.read()

    def info(self, path: str) -> dict:
        return json.loads(self.img("info", "-U", "--output=json", str(path)).stdout)

    def map(self, path: str) -> list:
        return json.loads(self.img("map", "--output=json", str(path)).stdout)


@pytest.fixture
def qemu() -> Qemu:
    """QEMU's tools. Missing tools fail the test under CI (CI set) and skip it elsewhere."""
    if not have_qemu():
        msg = "qemu-img/qemu-io are required: apt-get install qemu-utils qemu-system-common"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Qemu()


@pytest.fixture
def chain3(tmp_path, qemu):
    """A 3-layer qcow2 chain made by qemu-img/qemu-io: base <- mid <- top, 4 MiB.

    Returns (top, mid, base) paths. Data: base has patterns over most of the disk, mid
    overrides some clusters and zeroes one, top has writes of its own.
    """
    base = qemu.create(tmp_path / "base.qcow2", 4 << 20)
    qemu.io(base, "write -P 1 0 1M", "write -P 2 1M 512k", "write -P 3 3M 1M")
    mid = qemu.create(tmp_path / "mid.qcow2", 4 << 20, backing="base.qcow2")
    qemu.io(mid, "write -P 4 256k 128k", "write -z 1M 64k", "write -P 5 2M 64k")
    top = qemu.create(tmp_path / "top.qcow2", 4 << 20, backing="mid.qcow2")
    qemu.io(top, "write -P 6 512k 64k", "write -P 7 3500k 10k")
    return str(top), str(mid), str(base)
