"""QMP control of a served pull (``serve(control=...)``), spoken as a QMP client speaks
it to qemu-storage-daemon: greeting, qmp_capabilities, block-stream on node "top",
block-job-* and job-* commands, query-block-jobs, and QEMU's events."""
from __future__ import annotations

import json
import os
import socket
import stat

import pytest

import blockpull
from test_nbd import make_chain, nbdtools, qio  # noqa: F401 (a fixture)


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(path)
        self.buf = b""
        self.events = []
        self.greeting = self._recv()

    def _recv(self):
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("QMP connection closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name, "id": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode())
        while True:
            r = self._recv()
            if "event" in r:
                self.events.append(r)
                continue
            assert r.get("id") == name, r
            return r

    def wait_event(self, name):
        for e in self.events:
            if e["event"] == name:
                return e
        while True:
            r = self._recv()
            assert "event" in r, r
            self.events.append(r)
            if r["event"] == name:
                return r

    def wait_status(self, job_id, status):
        """Wait for JOB_STATUS_CHANGE of ``job_id`` to ``status``."""
        seen = 0
        while True:
            for e in self.events[seen:]:
                if e["event"] == "JOB_STATUS_CHANGE" and e["data"] == {"id": job_id,
                                                                        "status": status}:
                    return e
            seen = len(self.events)
            r = self._recv()
            assert "event" in r, r
            self.events.append(r)

    def close(self):
        self.s.close()


def test_qmp_drives_the_pull_like_qemu_storage_daemon(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    ctl = str(tmp_path / "qmp.sock")
    with blockpull.serve(top, backing_format="qcow2", control=ctl) as srv:
        assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
        q = Qmp(ctl)
        assert "QMP" in q.greeting
        assert q.cmd("query-block-jobs")["error"]["class"] == "CommandNotFound"
        assert q.cmd("qmp_capabilities") == {"return": {}, "id": "qmp_capabilities"}
        assert q.cmd("query-block-jobs")["return"] == []
        assert q.cmd("block-stream", device="nope")["error"]["class"] == "DeviceNotFound"
        assert q.cmd("block-stream", device="top", **{"job-id": "j0"}, speed=1 << 20) == \
            {"return": {}, "id": "block-stream"}
        q.wait_status("j0", "created")
        q.wait_status("j0", "running")
        jobs = q.cmd("query-block-jobs")["return"]
        assert jobs[0]["device"] == "j0" and jobs[0]["type"] == "stream"
        assert jobs[0]["speed"] == 1 << 20 and jobs[0]["len"] > 0
        assert q.cmd("block-stream", device="top")["error"]["class"] == "GenericError"
        assert q.cmd("block-job-pause", device="j0")["return"] == {}
        q.wait_status("j0", "paused")
        assert q.cmd("query-block-jobs")["return"][0]["paused"] is True
        qio(srv.uri, "write -P 61 9M 64k")          # clients go on meanwhile
        assert q.cmd("block-job-set-speed", device="j0", speed=0)["return"] == {}
        assert q.cmd("block-job-resume", device="j0")["return"] == {}
        q.wait_status("j0", "running")
        done = q.wait_event("BLOCK_JOB_COMPLETED")
        assert done["data"]["device"] == "j0" and done["data"]["type"] == "stream"
        assert "error" not in done["data"] and done["data"]["offset"] > 0
        assert "seconds" in done["timestamp"]
        q.wait_status("j0", "null")
        assert q.cmd("query-block-jobs")["return"] == []
        assert q.cmd("block-job-cancel", device="j0")["error"]["class"] == "DeviceNotActive"
        assert q.cmd("no-such-command")["error"]["class"] == "CommandNotFound"
        q.close()
        assert srv.job.status == "completed"
    assert "backing-filename" not in qemu.info(top)
    qemu.assert_clean(top)
    assert not os.path.exists(ctl)


def test_qmp_cancel_and_quit(tmp_path, nbdtools):
    qemu = nbdtools
    top, ref = make_chain(qemu, str(tmp_path))
    ctl = str(tmp_path / "qmp.sock")
    srv = blockpull.serve(top, backing_format="qcow2", control=ctl, pull=True,
                          bandwidth="1M")
    try:
        q = Qmp(ctl)
        q.cmd("qmp_capabilities")
        jobs = q.cmd("query-jobs")["return"]
        assert jobs[0]["id"] == "top" and jobs[0]["status"] == "running"
        assert q.cmd("job-cancel", id="top")["return"] == {}
        ev = q.wait_event("BLOCK_JOB_CANCELLED")
        assert ev["data"]["device"] == "top"
        # garbage and a broken message do not take the server down
        q.s.sendall(b"[1, 2]")
        r = q._recv()
        while "event" in r:
            r = q._recv()
        assert r["error"]["class"] == "GenericError"
        assert q.cmd("quit") == {"return": {}, "id": "quit"}
        assert srv.wait(30)
        q.close()
    finally:
        srv.close()
    assert qemu.info(top)["backing-filename"] == "base.qcow2"
    qemu.assert_clean(top)
    assert qemu.compare(top, ref)
