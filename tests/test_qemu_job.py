"""blockpull.qemu.pull: the PullJob interface over QEMU's block-stream, against a
qemu-storage-daemon holding a qemu-img chain. qemu-img judges the images afterwards."""
from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest

import blockpull
from blockpull import qemu as bq
from qsd import Qsd, need_qsd, qcow2_node

SIZE = 4 << 20


@pytest.fixture
def chain(tmp_path, qemu):
    """base <- mid <- top (4 MiB) and a raw copy of what the guest sees."""
    need_qsd()
    base = qemu.create(tmp_path / "base.qcow2", SIZE)
    qemu.io(base, "write -P 1 0 1M", "write -P 2 1M 512k", "write -P 3 3M 1M")
    mid = qemu.create(tmp_path / "mid.qcow2", SIZE, backing="base.qcow2")
    qemu.io(mid, "write -P 4 256k 128k", "write -z 1M 64k", "write -P 5 2M 64k")
    top = qemu.create(tmp_path / "top.qcow2", SIZE, backing="mid.qcow2")
    qemu.io(top, "write -P 6 512k 64k", "write -P 7 3500k 10k")
    qemu.img("convert", "-O", "raw", top, str(tmp_path / "want.raw"))
    return top, mid, base, str(tmp_path / "want.raw")


@pytest.fixture
def daemon(tmp_path, chain):
    started = []

    def start(*blockdevs):
        d = Qsd(str(tmp_path), blockdevs or [qcow2_node(chain[0])])
        started.append(d)
        return d
    yield start
    for d in started:
        d.stop()


class Recorder:
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, ev):
        with self.lock:
            self.events.append(ev)

    def kinds(self):
        return [e.kind for e in self.events]


def backing(qemu, path):
    return qemu.info(path).get("backing-filename")


def test_whole_pull_completes_once_and_drops_the_backing(qemu, chain, daemon):
    top, _mid, _base, want = chain
    d = daemon()
    rec = Recorder()
    job = bq.pull(d.sockets[0], "top", on_event=rec)
    info = job.result(timeout=60)
    assert job.done() and job.status == "completed"
    assert (info.cur, info.end) == (SIZE, SIZE)      # QEMU's offset/len: the whole device
    assert rec.kinds() == ["completed"]
    assert rec.events[0].info.cur == SIZE and rec.events[0].error is None
    done = []
    job.add_done_callback(done.append)                # after the end: called at once
    assert done == [job]
    d.stop()
    assert backing(qemu, top) is None
    qemu.assert_clean(top)
    assert qemu.compare(top, want, fb="raw")


def test_partial_pull_keeps_base(qemu, chain, daemon):
    top, mid, base, want = chain
    d = daemon()
    job = bq.pull(d.sockets[0], "top", base=base)
    assert job.result(timeout=60).cur == SIZE
    d.stop()
    # QEMU records the base as it was named in block-stream
    assert os.path.join(os.path.dirname(top), backing(qemu, top)) == base
    qemu.assert_clean(top)
    assert qemu.compare(top, want, fb="raw")
    # mid's data now lives in top: top alone over base still reads as before
    at = [e for e in qemu.map(top) if e["start"] <= (256 << 10) < e["start"] + e["length"]]
    assert at[0]["depth"] == 0


def test_set_speed_pause_resume(qemu, chain, daemon):
    top, _mid, _base, want = chain
    d = daemon()
    rec = Recorder()
    job = bq.pull(d.sockets[0], "top", bandwidth=64 << 10, on_event=rec)
    assert job.info().bandwidth == 64 << 10
    job.set_speed("1M")
    assert job.info().bandwidth == 1 << 20
    job.set_speed(32 << 10)
    job.pause()
    assert job.status == "paused" and job.info().status == "paused"
    cur = job.info().cur
    assert cur < SIZE
    job.pause()                                       # pausing twice is harmless
    assert not job.wait(0.3)
    assert job.info().cur == cur                      # a paused job does not progress
    job.set_speed(0)
    job.resume()
    info = job.result(timeout=60)
    assert info.cur == info.end == SIZE
    assert rec.kinds() == ["paused", "resumed", "completed"]
    d.stop()
    assert backing(qemu, top) is None
    assert qemu.compare(top, want, fb="raw")


@pytest.mark.parametrize("paused", [False, True])
def test_abort_leaves_the_image_backed(qemu, chain, daemon, paused):
    top, _mid, _base, want = chain
    d = daemon()
    rec = Recorder()
    job = bq.pull(d.sockets[0], "top", bandwidth=64 << 10, on_event=rec)
    if paused:
        job.pause()
    job.abort()
    assert job.done() and job.status == "cancelled"
    with pytest.raises(blockpull.PullCancelled):
        job.result()
    assert rec.kinds()[-1] == "cancelled"
    assert rec.kinds().count("cancelled") == 1
    assert job.info().cur < SIZE
    job.abort()                                       # after the end: nothing to do
    d.stop()
    assert backing(qemu, top) == "mid.qcow2"
    qemu.assert_clean(top)
    assert qemu.compare(top, want, fb="raw")


def _failing_chain(chain):
    """top over base, whose reads fail with EIO (blkdebug)."""
    top, mid, base, _ = chain
    bk = {"driver": "qcow2", "node-name": "bk",
          "file": {"driver": "blkdebug",
                   "inject-error": [{"event": "read_aio", "errno": errno.EIO}],
                   "image": {"driver": "file", "filename": base}}}
    mk = {"driver": "qcow2", "node-name": "mk", "backing": "bk",
          "file": {"driver": "file", "filename": mid}}
    tp = {"driver": "qcow2", "node-name": "top", "backing": "mk",
          "file": {"driver": "file", "filename": top}}
    return [json.dumps(bk), json.dumps(mk), json.dumps(tp)]


def test_error_is_a_pull_error(qemu, chain, daemon):
    top = chain[0]
    d = daemon(*_failing_chain(chain))
    rec = Recorder()
    job = bq.pull(d.sockets[0], "top", on_event=rec)
    with pytest.raises(blockpull.PullError) as ei:
        job.result(timeout=60)
    assert ei.value.errno == errno.EIO and ei.value.operation == "read"
    assert job.status == "failed" and job.error is ei.value
    assert rec.kinds() == ["failed"]
    d.stop()
    assert backing(qemu, top) == "mid.qcow2"
    qemu.assert_clean(top)


def test_error_under_stop_pauses_then_abort(qemu, chain, daemon):
    top = chain[0]
    d = daemon(*_failing_chain(chain))
    rec = Recorder()
    job = bq.pull(d.sockets[0], "top", on_error="stop", on_event=rec)
    deadline = time.monotonic() + 30
    while job.status != "paused" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.status == "paused"
    job.abort()
    kinds = rec.kinds()
    assert kinds[0] == "error" and rec.events[0].error.operation == "read"
    assert "paused" in kinds and kinds[-1] == "cancelled" and kinds.count("cancelled") == 1
    d.stop()
    assert backing(qemu, top) == "mid.qcow2"


def test_refusals_are_named(qemu, chain, daemon, tmp_path):
    d = daemon()
    with pytest.raises(blockpull.QemuError) as ei:
        bq.pull(d.sockets[0], "nope")
    assert ei.value.error_class == "GenericError"
    with pytest.raises(blockpull.BackingChainError):
        bq.pull(d.sockets[0], "top", base=str(tmp_path / "elsewhere.qcow2"))
    with pytest.raises(ValueError):
        bq.pull(d.sockets[0], "top", on_error="retry")
    job = bq.pull(d.sockets[0], "top", bandwidth=64 << 10)
    with pytest.raises(blockpull.JobActiveError):
        bq.pull(d.sockets[1], "top", job_id="other")
    job.abort()
    with pytest.raises(blockpull.QemuError) as ei:
        bq.pull(str(tmp_path / "no.sock"), "top")
    assert ei.value.error_class is None


def test_libvirt_shaped_functions_take_the_job(chain, daemon):
    d = daemon()
    job = bq.pull(d.sockets[0], "top", bandwidth=64 << 10)
    assert blockpull.block_job_set_speed(job, 1) == 0          # MiB/s
    assert job.info().bandwidth == 1 << 20
    info = blockpull.get_block_pull_info(job)
    assert info.end == SIZE and 0 <= info.cur < SIZE
    assert blockpull.block_pull_abort(job) == 0
    assert job.status == "cancelled"


def test_await(chain, daemon):
    import asyncio
    d = daemon()

    async def main():
        return await bq.pull(d.sockets[0], "top")
    assert asyncio.run(main()).cur == SIZE
    assert os.path.exists(chain[0])
