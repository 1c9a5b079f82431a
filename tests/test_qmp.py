"""The QMP control socket (blockpull.qmp), driven by the qemu.qmp client exactly as that
client drives a qemu-storage-daemon holding the same chain; the two must report alike.
qemu-img judges the images afterwards."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

import blockpull
from blockpull import qemu as bq
from qsd import Qsd, need_qsd, qcow2_node
from relhelp import child_env

SIZE = 4 << 20
SLOW = 64 << 10          # bytes/s: slow enough that the job is steered before it ends


def make_chain(qemu, d):
    os.makedirs(d, exist_ok=True)
    base = qemu.create(os.path.join(d, "base.qcow2"), SIZE)
    qemu.io(base, "write -P 1 0 1M", "write -P 2 1M 512k", "write -P 3 3M 1M")
    mid = qemu.create(os.path.join(d, "mid.qcow2"), SIZE, backing="base.qcow2")
    qemu.io(mid, "write -P 4 256k 128k", "write -z 1M 64k", "write -P 5 2M 64k")
    top = qemu.create(os.path.join(d, "top.qcow2"), SIZE, backing="mid.qcow2")
    qemu.io(top, "write -P 6 512k 64k", "write -P 7 3500k 10k")
    want = os.path.join(d, "want.raw")
    qemu.img("convert", "-O", "raw", top, want)
    return top, want


# ---- the one client function, run against both -------------------------------------------

async def drive(sock):
    """Start, query, set the speed, pause, resume, cancel, and run a pull to its end, over
    one qemu.qmp connection; returns what the server said, in order."""
    from qemu.qmp import ExecuteError, QMPClient
    c = QMPClient("test")
    await c.connect(sock)
    out = {"greeting": c.greeting._asdict()["QMP"], "events": [], "errors": {}}
    seen = asyncio.Queue()

    async def listen():
        async for ev in c.events:
            ev = dict(ev)
            out["events"].append(ev)
            await seen.put(ev)
    task = asyncio.ensure_future(listen())

    async def until(event, **data):
        while True:
            ev = await asyncio.wait_for(seen.get(), 60)
            if ev["event"] == event and all(ev["data"].get(k) == v for k, v in data.items()):
                return ev

    async def refused(name, cmd, args=None):
        try:
            await c.execute(cmd, args)
        except ExecuteError as exc:
            out["errors"][name] = exc.error_class
            return
        out["errors"][name] = "accepted"

    out["version"] = await c.execute("query-version")
    await c.execute("block-stream", {"device": "top", "job-id": "j0", "speed": SLOW})
    await until("JOB_STATUS_CHANGE", id="j0", status="running")
    out["q_running"] = await c.execute("query-block-jobs")
    await refused("second-stream", "block-stream", {"device": "top", "job-id": "j1"})
    await refused("same-id", "block-stream", {"device": "top", "job-id": "j0"})
    await c.execute("block-job-set-speed", {"device": "j0", "speed": 2 * SLOW})
    out["q_speed"] = await c.execute("query-block-jobs")
    await c.execute("block-job-pause", {"device": "j0"})
    await until("JOB_STATUS_CHANGE", id="j0", status="paused")
    out["q_paused"] = await c.execute("query-block-jobs")
    out["jobs_paused"] = await c.execute("query-jobs")
    await refused("pause-twice", "block-job-pause", {"device": "j0"})
    await refused("cancel-paused", "block-job-cancel", {"device": "j0"})
    await refused("no-block-job", "block-job-pause", {"device": "nope"})
    await refused("no-job", "job-pause", {"id": "nope"})
    await refused("no-device", "block-stream", {"device": "nope", "job-id": "j2"})
    await refused("bad-speed", "block-job-set-speed", {"device": "j0", "speed": "fast"})
    await refused("no-command", "no-such-command")
    await refused("dismiss-running", "job-dismiss", {"id": "j0"})
    await c.execute("block-job-resume", {"device": "j0"})
    await until("JOB_STATUS_CHANGE", id="j0", status="running")
    await refused("resume-running", "block-job-resume", {"device": "j0"})
    await c.execute("block-job-cancel", {"device": "j0"})
    out["cancelled"] = (await until("BLOCK_JOB_CANCELLED", device="j0"))["data"]
    await until("JOB_STATUS_CHANGE", id="j0", status="null")
    out["q_after_cancel"] = await c.execute("query-block-jobs")
    await c.execute("block-stream", {"device": "top", "job-id": "j1", "auto-dismiss": False})
    out["completed"] = (await until("BLOCK_JOB_COMPLETED", device="j1"))["data"]
    await until("JOB_STATUS_CHANGE", id="j1", status="concluded")
    out["q_concluded"] = await c.execute("query-jobs")
    await c.execute("job-dismiss", {"id": "j1"})
    await until("JOB_STATUS_CHANGE", id="j1", status="null")
    out["q_end"] = await c.execute("query-block-jobs")
    task.cancel()
    await c.disconnect()
    return out


def statuses(out, job_id):
    return [e["data"]["status"] for e in out["events"]
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]


def block_events(out, job_id):
    return [e["event"] for e in out["events"]
            if e["event"] != "JOB_STATUS_CHANGE" and e["data"].get("device") == job_id]


def shape(jobs):
    """A query-block-jobs answer without what differs by nature (progress, busy, ours)."""
    return [{k: v for k, v in j.items() if k not in ("offset", "busy", "x-blockpull")}
            for j in jobs]


def test_blockpull_and_qemu_storage_daemon_report_alike(qemu, tmp_path):
    need_qsd()
    q_top, want = make_chain(qemu, str(tmp_path / "q"))
    b_top, _ = make_chain(qemu, str(tmp_path / "b"))
    d = Qsd(str(tmp_path), [qcow2_node(q_top)], monitors=1)
    try:
        theirs = asyncio.run(drive(d.sockets[0]))
    finally:
        d.stop()
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.serve(b_top, control=ctl) as server:
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
        ours = asyncio.run(drive(ctl))
        assert server.job.status == "completed"

    # the greeting and versions have the same shape
    for out in (theirs, ours):
        assert set(out["greeting"]) == {"version", "capabilities"}
        assert set(out["version"]["qemu"]) == {"major", "minor", "micro"}
        assert isinstance(out["version"]["package"], str)
    assert ours["version"]["qemu"]["major"] == theirs["version"]["qemu"]["major"]
    # every event: QEMU's timestamp shape and the same data fields
    for out in (theirs, ours):
        for ev in out["events"]:
            assert set(ev) == {"timestamp", "event", "data"}
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert all(isinstance(v, int) for v in ev["timestamp"].values())
            assert 0 <= ev["timestamp"]["microseconds"] < 10 ** 6
    # the same state changes and block job events, in the same order
    for job in ("j0", "j1"):
        assert statuses(ours, job) == statuses(theirs, job), job
        assert block_events(ours, job) == block_events(theirs, job), job
    assert statuses(ours, "j0") == ["created", "running", "paused", "running", "aborting",
                                    "concluded", "null"]
    assert statuses(ours, "j1") == ["created", "running", "waiting", "pending", "concluded",
                                    "null"]
    # query-block-jobs: QEMU's fields and values, plus our exact counts
    for key in ("q_running", "q_speed", "q_paused", "q_after_cancel", "q_end"):
        assert shape(ours[key]) == shape(theirs[key]), key
    for key in ("q_running", "q_speed", "q_paused"):
        (j,) = ours[key]
        assert set(j) - {"x-blockpull"} == set(theirs[key][0])
        assert 0 <= j["offset"] <= j["len"] == SIZE
        x = j["x-blockpull"]
        assert 0 <= x["cur"] <= x["end"] and x["copied-bytes"] <= x["cur"]
    assert ours["q_speed"][0]["speed"] == 2 * SLOW
    assert ours["q_paused"][0]["paused"] is True
    assert [set(j) for j in ours["jobs_paused"]] == [set(j) for j in theirs["jobs_paused"]]
    assert [j["status"] for j in ours["jobs_paused"]] == ["paused"]
    assert [j["status"] for j in ours["q_concluded"]] == \
        [j["status"] for j in theirs["q_concluded"]] == ["concluded"]
    # the end events: the same fields; a completed job has done its whole length
    assert set(ours["cancelled"]) == set(theirs["cancelled"])
    assert set(ours["completed"]) == set(theirs["completed"])
    assert ours["completed"]["offset"] == ours["completed"]["len"] == \
        theirs["completed"]["offset"] == theirs["completed"]["len"] == SIZE
    # refusals with the same QMP error classes
    assert ours["errors"] == theirs["errors"]
    assert ours["errors"]["no-block-job"] == "DeviceNotActive"
    assert ours["errors"]["no-command"] == "CommandNotFound"
    # and the same images
    for top in (q_top, b_top):
        assert qemu.info(top).get("backing-filename") is None
        qemu.assert_clean(top)
        assert qemu.compare(top, want, fb="raw")


# ---- I/O errors under each policy, against both ---------------------------------------------

async def drive_error(sock, on_error):
    """A pull whose backing reads fail: the events, the stopped job's state, the end."""
    from qemu.qmp import ExecuteError, QMPClient
    c = QMPClient("test")
    await c.connect(sock)
    out = {"events": []}
    seen = asyncio.Queue()

    async def listen():
        async for ev in c.events:
            ev = dict(ev)
            out["events"].append((ev["event"], {k: v for k, v in ev["data"].items()
                                                if k not in ("offset", "len")}))
            await seen.put(ev)
    task = asyncio.ensure_future(listen())

    async def until(event, **data):
        while True:
            ev = await asyncio.wait_for(seen.get(), 60)
            if ev["event"] == event and all(ev["data"].get(k) == v for k, v in data.items()):
                return ev
    await c.execute("block-stream", {"device": "top", "job-id": "e0", "on-error": on_error})
    if on_error == "stop":
        await until("JOB_STATUS_CHANGE", id="e0", status="paused")
        out["stopped"] = shape(await c.execute("query-block-jobs"))
        try:
            await c.execute("block-job-cancel", {"device": "e0"})
            out["cancel-stopped"] = "accepted"
        except ExecuteError as exc:
            out["cancel-stopped"] = exc.error_class
        await c.execute("block-job-cancel", {"device": "e0", "force": True})
    await until("JOB_STATUS_CHANGE", id="e0", status="null")
    task.cancel()
    await c.disconnect()
    return out


def collapse(events):
    """Runs of the same BLOCK_JOB_ERROR as one (how many chunks fail is the engine's)."""
    out = []
    for ev in events:
        if not out or ev[0] != "BLOCK_JOB_ERROR" or out[-1] != ev:
            out.append(ev)
    return out


@pytest.mark.parametrize("on_error", ["report", "stop", "ignore"])
def test_io_errors_reported_alike(qemu, tmp_path, on_error):
    need_qsd()
    import errno
    from blockpull.faults import FaultInjector, attach
    from test_qemu_job import _failing_chain
    q_top, _ = make_chain(qemu, str(tmp_path / "q"))
    b_top, want = make_chain(qemu, str(tmp_path / "b"))
    d = tmp_path / "q"
    chain = (q_top, str(d / "mid.qcow2"), str(d / "base.qcow2"), None)
    qsd = Qsd(str(tmp_path), _failing_chain(chain), monitors=1)
    try:
        theirs = asyncio.run(drive_error(qsd.sockets[0], on_error))
    finally:
        qsd.stop()
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.serve(b_top, control=ctl) as server:
        inj = FaultInjector()
        # the copy's reads fail, not the planning's (QEMU plans nothing ahead)
        inj.fail("read", role="backing", errno=errno.EIO, times=None, match=in_job_thread)
        attach(server.image, inj)
        ours = asyncio.run(drive_error(ctl, on_error))
    assert collapse(ours["events"]) == collapse(theirs["events"])
    assert ours.get("stopped") == theirs.get("stopped")
    assert ours.get("cancel-stopped") == theirs.get("cancel-stopped")
    if on_error == "stop":
        assert ours["stopped"][0]["io-status"] == "failed"
    for top in (q_top, b_top):
        assert qemu.info(top).get("backing-filename") == "mid.qcow2"
        qemu.assert_clean(top)
    assert qemu.compare(b_top, want, fb="raw")


def in_job_thread(op, role, offset, length):
    return threading.current_thread().name.startswith("blockpull-pull")


def test_failed_start_leaves_no_job(qemu, tmp_path):
    """block-stream whose planning cannot read the chain: a GenericError, no job left
    behind (the server still closes), and a later block-stream works."""
    import errno
    from blockpull.faults import FaultInjector, attach, detach
    top, want = make_chain(qemu, str(tmp_path / "b"))
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.serve(top, control=ctl) as server:
        inj = FaultInjector()
        inj.fail("read", role="backing", errno=errno.EIO, times=None)
        attach(server.image, inj)
        a = Raw(ctl)
        a.ask({"execute": "qmp_capabilities"})
        r = a.ask({"execute": "block-stream", "arguments": {"device": "top"}})
        assert r["error"]["class"] == "GenericError" and "Input/output" in r["error"]["desc"]
        assert server.job is None
        assert a.ask({"execute": "query-block-jobs"}) == {"return": []}
        detach(server.image)
        assert a.ask({"execute": "block-stream", "arguments": {"device": "top"}}) == \
            {"return": {}}
        server.job.result(timeout=60)
        a.close()
    assert qemu.info(top).get("backing-filename") is None
    assert qemu.compare(top, want, fb="raw")


def test_query_during_a_slow_start_sees_the_job(qemu, tmp_path):
    """A query made while a pull is still being planned (``pull --control`` starts its
    pull right after the socket appears) waits for it, as QEMU's monitor would, instead
    of answering an empty list."""
    import time
    from blockpull.qmp import ControlServer
    top, want = make_chain(qemu, str(tmp_path / "b"))
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.open(top) as img:
        def slow_start(**kw):
            time.sleep(0.5)              # a long planning, made deterministic
            return img.pull(**kw)
        control = ControlServer(ctl, img, slow_start)
        try:
            a = Raw(ctl)
            a.ask({"execute": "qmp_capabilities"})
            starter = threading.Thread(target=lambda: control.start(bandwidth=64 << 10))
            starter.start()
            time.sleep(0.1)
            (j,) = a.ask({"execute": "query-block-jobs"})["return"]
            assert j["device"] == "top" and j["type"] == "stream"
            starter.join()
            img.job.abort()
            a.close()
        finally:
            control.close()


def test_events_reach_every_client(qemu, tmp_path):
    top, _ = make_chain(qemu, str(tmp_path / "b"))
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.serve(top, control=ctl):
        a, b, silent = Raw(ctl), Raw(ctl), Raw(ctl)
        for c in (a, b):
            c.ask({"execute": "qmp_capabilities"})
        # `silent` never negotiates: it gets no events
        a.send({"execute": "block-stream", "arguments": {"device": "top", "job-id": "x"}})
        for c in (a, b):
            seen = []
            while "null" not in seen:
                msg = json.loads(c.f.readline())
                if msg.get("event") == "JOB_STATUS_CHANGE":
                    seen.append(msg["data"]["status"])
            assert seen == ["created", "running", "waiting", "pending", "concluded", "null"]
        assert silent.ask({"execute": "query-jobs"})["error"]["class"] == "CommandNotFound"
        for c in (a, b, silent):
            c.close()


# ---- the wire: framing, bad input, several clients ------------------------------------------

class Raw:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        self.greeting = self.recv()

    def send(self, data):
        self.s.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def recv(self):
        while True:
            msg = json.loads(self.f.readline())
            if "event" not in msg:
                return msg

    def ask(self, data):
        self.send(data)
        return self.recv()

    def close(self):
        self.f.close()
        self.s.close()


def wire_answers(path, path2):
    """Raw bytes in, classes out: the same probes for both servers (a QEMU monitor takes
    one client at a time: its second client comes through a second monitor, ``path2``)."""
    a = Raw(path)
    out = {"before": a.ask({"execute": "query-version", "id": 1})}
    out["caps"] = a.ask({"execute": "qmp_capabilities"})
    out["caps-again"] = a.ask({"execute": "qmp_capabilities", "id": "x"})
    out["bad-json"] = a.ask(b'{"execute": nonsense}\n')
    out["not-object"] = a.ask(b'[1, 2]\n')
    out["no-execute"] = a.ask({"arguments": {}, "id": 7})
    out["bad-args"] = a.ask({"execute": "query-version", "arguments": [1]})
    out["extra-arg"] = a.ask({"execute": "query-block-jobs", "arguments": {"x": 1}})
    out["missing-arg"] = a.ask({"execute": "block-job-pause", "arguments": {}})
    # two commands in one write, split across writes: answered in order, ids echoed
    a.send(b'{"execute": "query-block-jobs", "id": "a"}{"execute": "query-ver')
    a.send(b'sion", "id": "b"}')
    out["pipelined"] = [a.recv()["id"], a.recv()["id"]]
    b = Raw(path2)
    out["second-client"] = b.ask({"execute": "qmp_capabilities"})
    out["still-first"] = a.ask({"execute": "query-block-jobs", "id": 9})
    b.close()
    a.close()
    return out


def classes(out):
    res = {}
    for k, v in out.items():
        if isinstance(v, dict):
            res[k] = (v.get("error", {}).get("class", "ok"), v.get("id"))
        else:
            res[k] = v
    return res


def test_wire_answers_match_qemu(qemu, tmp_path):
    need_qsd()
    top, _want = make_chain(qemu, str(tmp_path / "q"))
    d = Qsd(str(tmp_path), [qcow2_node(top)], monitors=2)
    try:
        theirs = wire_answers(d.sockets[0], d.sockets[1])
    finally:
        d.stop()
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.serve(top, control=ctl):
        ours = wire_answers(ctl, ctl)
    assert classes(ours) == classes(theirs)
    assert classes(ours)["bad-json"] == ("GenericError", None)
    assert classes(ours)["before"] == ("CommandNotFound", 1)
    assert ours["pipelined"] == ["a", "b"]


def test_garbage_never_kills_the_socket(qemu, tmp_path):
    top, _ = make_chain(qemu, str(tmp_path / "b"))
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.serve(top, control=ctl):
        a = Raw(ctl)
        a.ask({"execute": "qmp_capabilities"})
        for junk in (b"\xff\xfe\x00garbage\n", b"]]]\n", b"\"unterminated\n\"\n", b"123\n",
                     b"{" * 2000 + b"\n", b"{\"execute\": 5}\n", b"null\n"):
            assert "error" in a.ask(junk)
        a.s.sendall(b"{\"execute\": \"query")     # and a client that vanishes mid-message
        a.close()
        b = Raw(ctl)
        assert "return" in b.ask({"execute": "qmp_capabilities"})
        assert b.ask({"execute": "query-jobs"}) == {"return": []}
        b.close()


# ---- the same PullJob over blockpull's own socket; quit; the command line ------------------------

def test_qemu_pull_steers_blockpull_too(qemu, tmp_path):
    need_qsd()
    top, want = make_chain(qemu, str(tmp_path / "b"))
    ctl = str(tmp_path / "ctl.sock")
    with blockpull.serve(top, control=ctl) as server:
        events = []
        job = bq.pull(ctl, "top", bandwidth=SLOW, on_event=events.append)
        job.pause()
        assert server.job.status == "paused"
        job.set_speed(0)
        assert server.job.info().bandwidth == 0
        job.resume()
        info = job.result(timeout=60)
        assert info.cur == info.end == SIZE
        assert [e.kind for e in events] == ["paused", "resumed", "completed"]
    assert qemu.info(top).get("backing-filename") is None
    assert qemu.compare(top, want, fb="raw")


def test_quit_closes_the_server(qemu, tmp_path):
    top, _ = make_chain(qemu, str(tmp_path / "b"))
    ctl = str(tmp_path / "ctl.sock")
    server = blockpull.serve(top, control=ctl, pull=True, bandwidth=SLOW)
    a = Raw(ctl)
    a.ask({"execute": "qmp_capabilities"})
    (j,) = a.ask({"execute": "query-block-jobs"})["return"]
    assert j["device"] == "top" and j["x-blockpull"]["end"] > 0
    assert a.ask({"execute": "quit"}) == {"return": {}}
    assert server.wait(30)
    assert not os.path.exists(ctl)
    a.close()
    assert qemu.info(top).get("backing-filename") == "mid.qcow2"
    qemu.assert_clean(top)


def test_control_socket_refusals(qemu, tmp_path):
    top, _ = make_chain(qemu, str(tmp_path / "b"))
    taken = tmp_path / "taken.sock"
    taken.write_text("")
    with pytest.raises(blockpull.ServeError, match="already exists"):
        blockpull.serve(top, control=str(taken))
    with pytest.raises(blockpull.ServeError, match="cannot listen"):
        blockpull.serve(top, control=str(tmp_path / "no" / "dir.sock"))
    # the image was released each time
    blockpull.open(top).close()


def _cli(*args):
    # the child imports the blockpull under test (src/ or the installed one)
    return subprocess.Popen([sys.executable, "-m", "blockpull", *args], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_socket(path, proc):
    import time
    for _ in range(600):
        if os.path.exists(path):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_cli_serve_control(qemu, tmp_path):
    need_qsd()
    top, want = make_chain(qemu, str(tmp_path / "b"))
    ctl, nbd = str(tmp_path / "ctl.sock"), str(tmp_path / "nbd.sock")
    p = _cli("serve", "--socket", nbd, "--control", ctl, top)
    try:
        _wait_socket(ctl, p)
        job = bq.pull(ctl, "top")
        assert job.result(timeout=60).cur == SIZE
        a = Raw(ctl)
        a.ask({"execute": "qmp_capabilities"})
        assert a.ask({"execute": "quit"}) == {"return": {}}
        assert p.wait(30) == 0
        a.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert qemu.info(top).get("backing-filename") is None
    assert qemu.compare(top, want, fb="raw")


def test_cli_pull_control(qemu, tmp_path):
    top, want = make_chain(qemu, str(tmp_path / "b"))
    ctl = str(tmp_path / "ctl.sock")
    p = _cli("pull", "--bandwidth", "64K", "--control", ctl, top)
    try:
        _wait_socket(ctl, p)
        a = Raw(ctl)
        a.ask({"execute": "qmp_capabilities"})
        (j,) = a.ask({"execute": "query-block-jobs"})["return"]
        assert (j["device"], j["type"], j["speed"]) == ("top", "stream", 64 << 10)
        assert a.ask({"execute": "block-job-cancel", "arguments": {"device": "top"}}) == \
            {"return": {}}
        _out, err = p.communicate(timeout=30)
        assert p.returncode == 1 and "aborted" in err
        a.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not os.path.exists(ctl)
    assert qemu.info(top).get("backing-filename") == "mid.qcow2"
    qemu.assert_clean(top)
    assert qemu.compare(top, want, fb="raw")
