"""Benchmarks side by side with QEMU: chains built once per session, fresh copies per round.

Every chain is built with qemu-img/qemu-io. Only the top image changes during a pull (or a
block-stream job, or a copy), so a round starts from a fresh copy of the (small) top while
the backing files stay put and stay in the page cache. Each benchmark records its figures
through ``record``; at the end of the session a table is printed and written as JSON.
"""
from __future__ import annotations

import json
import os
import time
import shutil

import pytest

from benchlib import HERE, ORDER, RESULTS, Chains, machine


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.bench)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> str:
    d = os.environ.get("BLOCKPULL_BENCH_DIR")
    if d:
        d = os.path.join(d, f"run-{os.getpid()}")
        os.makedirs(d)
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        d = str(tmp_path_factory.mktemp("bench"))
        yield d
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def chains(workdir) -> Chains:
    if not (shutil.which("qemu-img") and shutil.which("qemu-io")):
        pytest.fail("qemu-img/qemu-io are required (apt-get install qemu-utils)")
    return Chains(workdir)


_LOAD_START = None


def pytest_sessionstart(session):
    global _LOAD_START
    _LOAD_START = os.getloadavg()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RESULTS:
        return
    m = machine()
    m["loadavg_start"] = _LOAD_START
    tr = terminalreporter
    tr.section("blockpull vs peers (medians of one run)")
    tr.write_line("machine: nproc=%s cpu=%s kernel=%s fs=%s; load average at start %s, at end %s"
                  % (m["nproc"], m["cpu"], m["kernel"], m["filesystem"],
                     "/".join("%.2f" % x for x in (_LOAD_START or ())),
                     "/".join("%.2f" % x for x in m["loadavg"])))
    tr.write_line("%-52s %12s  %s" % ("benchmark", "figure", "notes"))
    for name in ORDER:
        row = RESULTS[name]
        tr.write_line("%-52s %12s  %s" % (name, row.get("figure", ""), row.get("notes", "")))
    out = os.environ.get("BLOCKPULL_BENCH_JSON") or os.path.join(HERE, "results", "latest.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": m, "results": {k: RESULTS[k] for k in ORDER},
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=2, default=str)
    tr.write_line(f"saved {out}")
