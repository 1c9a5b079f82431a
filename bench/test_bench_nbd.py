"""The NBD export side by side with qemu-storage-daemon exporting the same image, with the
same clients, in one run: sequential read of the whole export (nbdcopy to null:), 4 KiB
random reads and writes with fio's nbd engine at queue depth 1 and 16, and a client's
4 KiB random-read latency while a pull (blockpull's, QEMU's block-stream) runs.

Both servers serve a fresh copy of the dense chain's top (1 GiB over three layers) as raw
over a Unix socket; blockpull without copy-on-read where qemu-storage-daemon has none.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time

import pytest

from benchlib import GiB, MiB, drop_file, record, run

import blockpull

ROUNDS = int(os.environ.get("BLOCKPULL_BENCH_ROUNDS", "5"))
DENSE = int(os.environ.get("BLOCKPULL_BENCH_NBD_SIZE", str(GiB)))
FIO_SECONDS = float(os.environ.get("BLOCKPULL_BENCH_FIO_SECONDS", "5"))


def _need(*tools):
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} required (apt-get install libnbd-bin fio "
                    f"qemu-system-common)")


class Blockpull:
    name = "blockpull"

    def __init__(self, path, copy_on_read=False, pull_bw=None):
        self.srv = blockpull.serve(path, copy_on_read=copy_on_read)
        self.uri = self.srv.uri
        self.pull_bw = pull_bw

    def start_pull(self, bw):
        self.job = self.srv.pull(bandwidth=bw)
        self.t0 = time.perf_counter()

    def pull_done(self):
        return self.job.done()

    def wait_pull(self):
        self.job.result()
        return self.job.info().copied_bytes, time.perf_counter() - self.t0

    def close(self):
        self.srv.close()


class StorageDaemonExport:
    """qemu-storage-daemon with the image as node ``top``, exported over NBD, and QMP."""
    name = "qemu-storage-daemon"

    def __init__(self, path, fmt="qcow2"):
        from qemu.qmp.legacy import QEMUMonitorProtocol
        self.sock = path + ".nbd"
        self.qmp_sock = path + ".qmp"
        drop_file(self.sock)
        drop_file(self.qmp_sock)
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver={fmt},node-name=top,file.driver=file,file.filename={path}",
             "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
             "--export", "type=nbd,id=e,node-name=top,writable=on",
             "--chardev", f"socket,id=mon,path={self.qmp_sock},server=on,wait=off",
             "--monitor", "chardev=mon"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("qemu-storage-daemon did not start")
            if os.path.exists(self.qmp_sock) and os.path.exists(self.sock):
                self.qmp = QEMUMonitorProtocol(self.qmp_sock)
                try:
                    self.qmp.connect()
                    break
                except Exception:
                    self.qmp.close()
            time.sleep(0.01)
        self.uri = f"nbd+unix:///top?socket={self.sock}"

    def start_pull(self, bw):
        args = {"job-id": "s", "device": "top"}
        if bw:
            args["speed"] = bw
        r = self.qmp.cmd_obj({"execute": "block-stream", "arguments": args})
        assert "error" not in r, r
        self.t0 = time.perf_counter()
        self._done = False

    def pull_done(self):
        while True:
            ev = self.qmp.pull_event(wait=False)
            if ev is None:
                return self._done
            if ev["event"] == "BLOCK_JOB_COMPLETED":
                self._done = True
                self._len = ev["data"]["len"]
                self._t1 = time.perf_counter()

    def wait_pull(self):
        while not self.pull_done():
            time.sleep(0.01)
        return self._len, self._t1 - self.t0

    def close(self):
        try:
            self.qmp.close()
        except Exception:
            pass
        self.proc.terminate()
        self.proc.wait(30)
        drop_file(self.sock)
        drop_file(self.qmp_sock)


def _servers(c):
    """A fresh copy of the top for each server."""
    a = c.fresh_top("nbd-a")
    b = c.fresh_top("nbd-b")
    return [lambda: Blockpull(a), lambda: StorageDaemonExport(b)]


def test_nbd_sequential_read(benchmark, chains):
    """nbdcopy of the whole export to null:, rounds rotating between the servers."""
    _need("nbdcopy", "qemu-storage-daemon")
    c = chains.get("dense", "qcow2", size=DENSE)
    makers = _servers(c)
    times = {"blockpull": [], "qemu-storage-daemon": []}
    state = {"round": 0}

    def one_round():
        k = state["round"] % 2
        state["round"] += 1
        for make in makers[k:] + makers[:k]:
            srv = make()
            try:
                t0 = time.perf_counter()
                run("nbdcopy", srv.uri, "null:")
                times[srv.name].append(time.perf_counter() - t0)
            finally:
                srv.close()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    q = med["qemu-storage-daemon"]
    for name, t in med.items():
        record(f"NBD sequential read (nbdcopy): {name}", figure="%.0f MiB/s" % (DENSE / t / MiB),
               notes="median of %d, %.3f s; %.2fx qemu-storage-daemon's rate" % (ROUNDS, t, q / t))


def _fio(uri, rw, qd, seconds):
    r = run("fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--iodepth={qd}", f"--size={DENSE}", f"--runtime={seconds}", "--time_based",
            "--output-format=json")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    return side["iops"], pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000


@pytest.mark.parametrize("rw", ["randread", "randwrite"])
@pytest.mark.parametrize("qd", [1, 16])
def test_nbd_fio_4k(benchmark, chains, rw, qd):
    """fio's nbd engine, 4 KiB random I/O; the servers alternate for ROUNDS rounds."""
    _need("fio", "qemu-storage-daemon")
    c = chains.get("dense", "qcow2", size=DENSE)
    makers = _servers(c)
    iops = {"blockpull": [], "qemu-storage-daemon": []}
    state = {"round": 0}

    def one_round():
        k = state["round"] % 2
        state["round"] += 1
        for make in makers[k:] + makers[:k]:
            srv = make()
            try:
                iops[srv.name].append(_fio(srv.uri, rw, qd, FIO_SECONDS)[0])
            finally:
                srv.close()
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = {k: statistics.median(v) for k, v in iops.items()}
    q = med["qemu-storage-daemon"]
    for name, v in med.items():
        record(f"NBD 4 KiB {rw} QD{qd}: {name}", figure="%.0f IOPS" % v,
               notes="median of %d x %.0f s; %.1f us per request; %.2fx qemu-storage-daemon"
               % (ROUNDS, FIO_SECONDS, 1e6 / v, v / q))


def test_nbd_latency_while_pulling(benchmark, chains):
    """A client's 4 KiB random reads (QD1) with no pull, an unlimited pull and a
    100 MiB/s pull of the served image, and the pull's rate meanwhile."""
    _need("fio", "qemu-storage-daemon")
    c = chains.get("dense", "qcow2", size=DENSE)
    out = {}

    def one_round():
        for cls in (Blockpull, StorageDaemonExport):
            for label, bw in (("no pull", None), ("unlimited pull", 0),
                              ("100 MiB/s pull", 100 * MiB)):
                path = c.fresh_top("lat")
                srv = cls(path)
                try:
                    res = {}
                    if bw is not None:
                        srv.start_pull(bw)
                    fio_s = FIO_SECONDS
                    res["fio"] = _fio(srv.uri, "randread", 1, fio_s)
                    if bw is not None:
                        nbytes, secs = srv.wait_pull()
                        res["pull"] = nbytes / secs / MiB
                    out.setdefault((srv.name, label), []).append(res)
                finally:
                    srv.close()
                    drop_file(path)
    benchmark.pedantic(one_round, rounds=max(1, ROUNDS // 2), iterations=1)
    idle = {}
    for (name, label), rs in out.items():
        p50 = statistics.median(r["fio"][1] for r in rs)
        p99 = statistics.median(r["fio"][2] for r in rs)
        if label == "no pull":
            idle[name] = p99
        pull = statistics.median(r["pull"] for r in rs) if "pull" in rs[0] else None
        notes = "p50 %.0f us, p99 %.0f us" % (p50, p99)
        if pull is not None:
            notes += "; pull %.0f MiB/s" % pull
        if name in idle and label != "no pull":
            notes += "; p99 %.2fx idle" % (p99 / idle[name])
        record(f"NBD 4 KiB randread QD1, {label}: {name}", figure="%.0f us p99" % p99,
               notes=notes)
