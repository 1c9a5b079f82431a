"""A keep-compressed pull on a full disk keeps the compressed clusters whose bytes
reached the file, as an inflating pull keeps the whole clusters a failed write let
through: before, a chunk holding kept clusters was given back whole, so a pull whose
first chunk met the full disk (one big chunk, or several chunks in flight each cut
short) linked nothing at all. See enospc_keep_child.py for what each run checks."""
from __future__ import annotations

import os
import subprocess

import pytest

from relhelp import PY, child_env

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enospc_keep_child.py")


@pytest.mark.parametrize("depth,chunk,mode", [(1, 16 << 20, "report"), (4, 1 << 20, "report"),
                                              (1, 16 << 20, "stop")],
                         ids=["one-big-chunk", "four-in-flight", "stop-and-resume"])
def test_keep_compressed_full_tmpfs_keeps_what_was_written(tmp_path, qemu, depth, chunk,
                                                           mode):
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]
    r = subprocess.run(prefix + [PY, CHILD, str(tmp_path), str(depth), str(chunk), mode],
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
