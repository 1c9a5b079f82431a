"""A full file system during a pull: a 40 MiB pull into an overlay on a 10 MiB tmpfs
(a real ENOSPC, in a private mount namespace), under each on_error policy and through
the command line; and into an external data file on an ext4 file system (on a loop
device) with about 10 MiB free. What was copied stays linked and durable, nothing leaks
(``qemu-img check`` clean), the image reads as the chain did, and with room again the
pull completes. See enospc_pull_child.py for what each run checks.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from relhelp import PY, child_env

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enospc_pull_child.py")
DATAFILE_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              "enospc_datafile_child.py")


def namespace():
    return ["unshare", "--mount"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
@pytest.mark.parametrize("mode", ["report", "stop", "ignore", "cli"])
def test_full_tmpfs_keeps_what_was_copied(tmp_path, qemu, mode, fmt):
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]
    r = subprocess.run(prefix + [PY, CHILD, str(tmp_path), mode, fmt], capture_output=True,
                       text=True, env=child_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


@pytest.mark.parametrize("case", ["one-big-chunk", "four-in-flight", "extl2", "stop"])
def test_full_data_file_keeps_the_clusters_written(tmp_path, qemu, case):
    # a data-file top is written at guest offsets, a run at a time: what a failed chunk
    # write let through is kept cluster by cluster, as for a top without a data file
    r = subprocess.run(namespace() + [PY, DATAFILE_CHILD, str(tmp_path), case],
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
