"""QMP control of a served image's pull: the part of QEMU's monitor protocol that
qemu-storage-daemon's users drive a block-stream job with.

The served image is the block node ``top``; a job's id defaults to its node name. Spoken:
the greeting, ``qmp_capabilities``, ``query-block-jobs``, ``query-jobs``,
``block-stream``, ``block-job-set-speed``/``-pause``/``-resume``/``-cancel``,
``job-pause``/``-resume``/``-cancel``/``-dismiss``/``-finalize``, ``quit``; the events
``JOB_STATUS_CHANGE``, ``BLOCK_JOB_COMPLETED``, ``BLOCK_JOB_CANCELLED`` and
``BLOCK_JOB_ERROR`` with QEMU's field names (QEMU's qapi/block-core.json and
qapi/job.json). One JSON object per message, as QMP frames them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Set

if TYPE_CHECKING:  # pragma: no cover
    from blockpull.nbd.server import Server

log = logging.getLogger("blockpull")

NODE = "top"
#: the longest QMP message accepted, bytes
MAX_MESSAGE = 64 << 10

#: the pull's on_error policies for QEMU's on-error values
_ON_ERROR = {"report": "report", "stop": "stop", "enospc": "stop", "ignore": "ignore"}
#: QEMU's action names for blockpull's policies, in BLOCK_JOB_ERROR
_ACTION = {"report": "report", "stop": "stop", "ignore": "ignore"}


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls


def _timestamp() -> Dict[str, int]:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t - int(t)) * 1e6)}


class Control:
    """The QMP side of one Server: its clients, the job's id, and the events."""

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.clients: Set["_Client"] = set()
        self.tasks: Set["asyncio.Task[Any]"] = set()
        self.job_id: Optional[str] = None
        self.dismissed = False

    # ---- events (any thread) -------------------------------------------------------------

    def emit(self, event: str, data: Dict[str, Any]) -> None:
        msg = {"event": event, "data": data, "timestamp": _timestamp()}
        loop = self.server._loop
        if loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, msg)
        except RuntimeError:
            pass

    def _broadcast(self, msg: Dict[str, Any]) -> None:
        for c in list(self.clients):
            if c.ready:
                c.send(msg)

    def status(self, job: Any) -> str:
        """QEMU's job status for a PullJob."""
        s = job.status
        if s == "paused":
            return "paused"
        if s == "running":
            return "running"
        return "null" if self.dismissed else "concluded"

    def on_event(self, ev: Any) -> None:
        """The PullJob's on_event (its thread): QEMU's events for it."""
        jid = self.job_id or NODE
        info = ev.info
        if ev.kind == "paused":
            self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": "paused"})
        elif ev.kind == "resumed":
            self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": "running"})
        elif ev.kind == "error" and ev.error is not None:
            self.emit("BLOCK_JOB_ERROR", {"device": jid,
                                          "operation": ev.error.operation or "write",
                                          "action": _ACTION.get(ev.job.on_error, "report")})
        elif ev.kind in ("completed", "failed", "cancelled"):
            for st in ("waiting", "pending"):
                self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": st})
            data = {"device": jid, "len": info.end, "offset": info.cur,
                    "speed": info.bandwidth, "type": "stream"}
            if ev.kind == "cancelled":
                self.emit("BLOCK_JOB_CANCELLED", data)
            else:
                if ev.kind == "failed":
                    data["error"] = str(ev.error) if ev.error else "pull failed"
                self.emit("BLOCK_JOB_COMPLETED", data)
            # auto-dismissed: gone from the queries before anyone hears it concluded
            self.dismissed = True
            self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": "concluded"})
            self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": "null"})

    def started(self, job_id: str) -> None:
        self.job_id = job_id
        self.dismissed = False
        for st in ("created", "running"):
            self.emit("JOB_STATUS_CHANGE", {"id": job_id, "status": st})

    # ---- commands (loop thread) ------------------------------------------------------------

    def _job(self, name: Optional[str]) -> Any:
        job = self.server.job
        if job is None or self.dismissed or name not in (self.job_id, NODE) or job.done():
            raise QmpError(f"Block job '{name}' not found", "DeviceNotActive")
        return job

    def execute(self, cmd: str, args: Dict[str, Any]) -> Any:
        srv = self.server
        if cmd == "query-block-jobs":
            job = srv.job
            if job is None or self.dismissed:
                return []
            i = job.info()
            return [{"type": "stream", "device": self.job_id or NODE, "len": i.end,
                     "offset": i.cur, "busy": i.status == "running",
                     "paused": i.status == "paused", "speed": i.bandwidth,
                     "io-status": "ok", "ready": False, "status": self.status(job),
                     "auto-finalize": True, "auto-dismiss": True}]
        if cmd == "query-jobs":
            job = srv.job
            if job is None or self.dismissed:
                return []
            i = job.info()
            return [{"id": self.job_id or NODE, "type": "stream", "status": self.status(job),
                     "current-progress": i.cur, "total-progress": i.end}]
        if cmd == "block-stream":
            device = args.get("device")
            if device != NODE:
                raise QmpError(f"Cannot find device='{device}' nor node-name='{device}'",
                               "DeviceNotFound")
            job_id = args.get("job-id") or NODE
            base = args.get("base") or args.get("base-node")
            speed = args.get("speed", 0)
            on_error = _ON_ERROR.get(args.get("on-error", "report"))
            if on_error is None:
                raise QmpError(f"on-error {args.get('on-error')!r} is not supported")
            if not isinstance(speed, int) or speed < 0:
                raise QmpError("Parameter 'speed' expects a non-negative integer")
            job = srv.job
            if job is not None and not job.done():
                raise QmpError(f"Node '{NODE}' is busy: block device is in use by block "
                               f"job: stream")
            try:
                srv.pull(base=base, bandwidth=speed, on_error=on_error, job_id=job_id)
            except Exception as exc:
                raise QmpError(str(exc)) from exc
            return {}
        if cmd in ("block-job-set-speed", "block-job-pause", "block-job-resume",
                   "block-job-cancel"):
            job = self._job(args.get("device"))
            if cmd == "block-job-set-speed":
                speed = args.get("speed")
                if not isinstance(speed, int) or speed < 0:
                    raise QmpError("Parameter 'speed' expects a non-negative integer")
                job.set_speed(speed)
            elif cmd == "block-job-pause":
                job.pause(wait=False)
            elif cmd == "block-job-resume":
                job.resume()
            else:
                job.abort(wait=False)
            return {}
        if cmd in ("job-pause", "job-resume", "job-cancel"):
            job = self._job(args.get("id"))
            {"job-pause": lambda: job.pause(wait=False), "job-resume": job.resume,
             "job-cancel": lambda: job.abort(wait=False)}[cmd]()
            return {}
        if cmd in ("job-dismiss", "job-finalize"):
            if args.get("id") not in (self.job_id, NODE):
                raise QmpError(f"Job '{args.get('id')}' not found", "GenericError")
            return {}
        if cmd == "quit":
            threading.Thread(target=srv.close, name="blockpull-qmp-quit", daemon=True).start()
            return {}
        raise QmpError(f"The command {cmd} has not been found", "CommandNotFound")


class _Client:
    """One QMP connection (loop thread)."""

    def __init__(self, control: Control, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.control = control
        self.reader = reader
        self.writer = writer
        self.ready = False

    def send(self, msg: Dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")

    async def run(self) -> None:
        self.send({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 0},
                                       "package": "blockpull"}, "capabilities": []}})
        dec = json.JSONDecoder()
        buf = ""
        while True:
            chunk = await self.reader.read(4096)
            if not chunk:
                return
            buf += chunk.decode("utf-8", "replace")
            if len(buf) > MAX_MESSAGE:
                return
            while True:
                buf = buf.lstrip()
                if not buf:
                    break
                try:
                    obj, end = dec.raw_decode(buf)
                except json.JSONDecodeError:
                    break               # incomplete: wait for more
                buf = buf[end:]
                self.handle(obj)
            await self.writer.drain()

    def handle(self, obj: Any) -> None:
        reply: Dict[str, Any]
        if not isinstance(obj, dict) or not isinstance(obj.get("execute"), str):
            self.send({"error": {"class": "GenericError",
                                 "desc": "QMP input must be a JSON object with 'execute'"}})
            return
        cmd = obj["execute"]
        args = obj.get("arguments") or {}
        try:
            if not isinstance(args, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
            if cmd == "qmp_capabilities":
                if self.ready:
                    raise QmpError("Capabilities negotiation is already complete, command "
                                   "ignored", "CommandNotFound")
                self.ready = True
                reply = {"return": {}}
            elif not self.ready:
                raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            else:
                reply = {"return": self.control.execute(cmd, args)}
        except QmpError as exc:
            reply = {"error": {"class": exc.cls, "desc": str(exc)}}
        except Exception as exc:  # never let a command take the server down
            log.exception("QMP command %s failed", cmd)
            reply = {"error": {"class": "GenericError", "desc": str(exc)}}
        if "id" in obj:
            reply["id"] = obj["id"]
        self.send(reply)


async def client_connected(control: Control, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    c = _Client(control, reader, writer)
    control.clients.add(c)
    task = asyncio.current_task()
    if task is not None:
        control.tasks.add(task)
    try:
        await c.run()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        control.clients.discard(c)
        if task is not None:
            control.tasks.discard(task)
        writer.close()


def events_for(control: Optional[Control],
               user: Optional[Callable[[Any], None]]) -> Optional[Callable[[Any], None]]:
    """The on_event a served pull gets: the QMP events, then the caller's callback."""
    if control is None:
        return user

    def both(ev: Any) -> None:
        control.on_event(ev)
        if user is not None:
            user(ev)
    return both


__all__: List[str] = ["Control", "client_connected", "events_for", "NODE"]
