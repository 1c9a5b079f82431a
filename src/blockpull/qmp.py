"""A QMP control socket: steer a pull with the protocol QEMU's tools already speak.

``ControlServer(path, image, start)`` listens on a Unix socket (mode 0600) and speaks QMP,
the QEMU Machine Protocol (QEMU's docs/interop/qmp-spec.rst): the greeting, capabilities
negotiation, commands with optional ``id``, and asynchronous events with a
``{"seconds", "microseconds"}`` timestamp. The commands and events mirror QEMU's schema
(qapi/block-core.json, qapi/job.json) for a stream job on one image:

- the image is the block node ``top``; its backing files are ``backing1``, ``backing2``, ...
  (1 = top's backing file), for ``base-node``;
- ``block-stream`` starts a pull (``device``, ``job-id`` (default: the node name),
  ``base`` or ``base-node``, ``speed``, ``on-error``, ``auto-dismiss``);
- ``query-block-jobs`` gives QEMU's fields; ``len`` is the image's size and ``offset`` the
  part of it done, as QEMU counts a stream job's progress through the device; blockpull's
  exact byte counts are under ``x-blockpull`` (``cur``/``end`` bytes to copy, and
  ``copied-bytes``, ``zeroed-bytes``, ``errors``);
- ``block-job-set-speed`` (bytes/s), ``-pause``, ``-resume``, ``-cancel``, ``-dismiss``,
  ``job-pause``/``-resume``/``-cancel``/``-dismiss``, ``query-jobs``, ``query-version``,
  ``query-commands``, ``quit``;
- events ``JOB_STATUS_CHANGE``, ``BLOCK_JOB_COMPLETED``, ``BLOCK_JOB_CANCELLED``,
  ``BLOCK_JOB_ERROR``, sent to every negotiated client.

Errors carry QMP's classes (``GenericError``, ``CommandNotFound``, ``DeviceNotActive``).
Input that is not JSON, not an object, or names an unknown command or argument gets an
error reply; the connection carries on. Any number of clients may connect.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket as _socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set

from blockpull.errors import BlockpullError, JobActiveError, ServeError
from blockpull.policy import OnError

log = logging.getLogger("blockpull")

__all__ = ["ControlServer", "QEMU_VERSION"]

#: the QEMU release whose QMP schema the commands and events follow (query-version)
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
MAX_MESSAGE = 1 << 20      # bytes of one JSON value
MAX_DEPTH = 1024           # nesting of one JSON value
NODE = "top"
START_WAIT = 60.0          # seconds a query waits for a pull being started (planned)

StartFn = Callable[..., Any]   # (base, bandwidth, on_error, on_event) -> PullJob


class QMPError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _timestamp() -> Dict[str, int]:
    t = time.time()
    sec = int(t)
    return {"seconds": sec, "microseconds": int((t - sec) * 1e6)}


class _Record:
    """One job as QMP sees it: QEMU's state machine over a PullJob."""

    def __init__(self, job_id: str, auto_dismiss: bool, on_error: str) -> None:
        self.id = job_id
        self.auto_dismiss = auto_dismiss
        self.on_error = on_error
        self.job: Any = None
        self.status = "created"          # QEMU's JobStatus
        self.started = False
        self.pending: List[Any] = []     # job events that came before the start was told
        self.io_status = "ok"
        self.user_paused = False         # a pause was asked for and not resumed yet
        self.error: Optional[str] = None
        self.final: Any = None           # the last PullInfo, once ended


class ControlServer:
    """A QMP socket steering the pulls of ``image``.

    ``start(base=, bandwidth=, on_error=, on_event=)`` starts a pull of the image and
    returns its PullJob (``Image.pull`` or a server's equivalent); ``on_quit()`` is called
    (on a thread of its own) when a client sends ``quit``. ``close()`` stops listening and
    disconnects the clients; it does not touch the jobs. Raises ServeError if the socket
    cannot be created.
    """

    def __init__(self, path: str, image: Any, start: StartFn,
                 on_quit: Optional[Callable[[], None]] = None) -> None:
        self.image = image
        self._start_fn = start
        self._on_quit = on_quit
        self._jobs: Dict[str, _Record] = {}
        self._lock = threading.Lock()
        self._clients: Set["_Client"] = set()
        self._closed = False
        path = os.path.abspath(os.fspath(path))
        if len(os.fsencode(path)) > 107:
            raise ServeError(f"{path}: longer than the 107 bytes a Unix socket path may "
                             f"have; choose a shorter control socket path")
        if os.path.lexists(path):
            raise ServeError(f"{path}: already exists; remove it or choose another control "
                             f"socket path")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)      # before listen(): nobody else can connect meanwhile
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise ServeError(f"cannot listen on the control socket {path}: "
                             f"{exc.strerror or exc}; choose another path") from exc
        self.path = path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="blockpull-qmp")
        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(
                asyncio.start_unix_server(self._client, sock=sock, limit=MAX_MESSAGE),
                self._loop).result()
        except BaseException:   # leave no thread, socket or file behind
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            sock.close()
            os.unlink(path)
            raise
        log.info("QMP control socket at %s", path)

    # ---- jobs ---------------------------------------------------------------------------

    def start(self, base: Optional[str] = None, bandwidth: Any = 0, on_error: str = "report",
              on_event: Optional[Callable[[Any], None]] = None, job_id: str = NODE,
              auto_dismiss: bool = True) -> Any:
        """Start a pull through ``start`` and make it a QMP job named ``job_id``; the
        caller's ``on_event`` still gets every event. Raises JobActiveError if the job id
        is taken, and what ``start`` raises."""
        rec = _Record(job_id, auto_dismiss, on_error)
        with self._lock:
            if job_id in self._jobs:
                raise JobActiveError(f"Job ID '{job_id}' already in use")
            self._jobs[job_id] = rec

        def _event(ev: Any) -> None:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._job_event, rec, ev)
            if on_event is not None:
                on_event(ev)
        try:
            job = self._start_fn(base=base, bandwidth=bandwidth, on_error=on_error,
                                 on_event=_event)
        except BaseException:
            with self._lock:
                self._jobs.pop(job_id, None)
            raise
        rec.job = job
        if not self._closed:
            self._loop.call_soon_threadsafe(self._started, rec)
        return job

    def _started(self, rec: _Record) -> None:
        rec.started = True
        self._status(rec, "created")
        self._status(rec, "running")
        for ev in rec.pending:
            self._job_event(rec, ev)
        rec.pending = []

    def _status(self, rec: _Record, status: str) -> None:
        rec.status = status
        self._broadcast("JOB_STATUS_CHANGE", {"status": status, "id": rec.id})
        if status == "null":
            with self._lock:
                if self._jobs.get(rec.id) is rec:
                    del self._jobs[rec.id]

    def _job_event(self, rec: _Record, ev: Any) -> None:
        """A PullJob event, on the loop: QEMU's state changes and events for it."""
        if not rec.started:
            rec.pending.append(ev)
            return
        kind = ev.kind
        if kind == "paused":
            if rec.status == "running":
                self._status(rec, "paused")
        elif kind == "resumed":
            rec.io_status = "ok"
            if rec.status == "paused":
                self._status(rec, "running")
        elif kind == "error":
            rec.io_status = "failed" if rec.on_error == "stop" else rec.io_status
            self._broadcast("BLOCK_JOB_ERROR", {
                "device": rec.id, "operation": (ev.error and ev.error.operation) or "read",
                "action": rec.on_error})
        elif kind in ("completed", "failed", "cancelled"):
            rec.final = ev.info
            data = self._progress(rec, ev.info)
            if kind == "completed":
                self._status(rec, "waiting")
                self._status(rec, "pending")
                self._broadcast("BLOCK_JOB_COMPLETED", data)
            else:
                err = ev.error
                if kind == "failed" and rec.on_error == "report" and err is not None \
                        and err.operation in ("read", "write"):
                    self._broadcast("BLOCK_JOB_ERROR", {"device": rec.id,
                                                        "operation": err.operation,
                                                        "action": "report"})
                self._status(rec, "aborting")
                if kind == "cancelled":
                    self._broadcast("BLOCK_JOB_CANCELLED", data)
                else:
                    desc = os.strerror(err.errno) if err is not None and err.errno \
                        else str(err or "failed")
                    rec.error = desc
                    self._broadcast("BLOCK_JOB_COMPLETED", dict(data, error=desc))
            self._status(rec, "concluded")
            if rec.auto_dismiss:
                self._status(rec, "null")

    def _info(self, rec: _Record) -> Any:
        return rec.final if rec.final is not None else rec.job.info()

    def _progress(self, rec: _Record, info: Any) -> Dict[str, Any]:
        size = int(self.image.size)
        if info.end > 0:
            offset = size * min(info.cur, info.end) // info.end
        else:
            offset = size if info.status == "completed" else 0
        return {"device": rec.id, "len": size, "offset": offset, "speed": int(info.bandwidth),
                "type": "stream"}

    def _block_job_info(self, rec: _Record) -> Dict[str, Any]:
        info = self._info(rec)
        paused = rec.user_paused or rec.status == "paused"
        status = rec.status
        d = self._progress(rec, info)
        d.update({"busy": status == "running", "paused": paused, "ready": False,
                  "status": status, "io-status": rec.io_status, "auto-finalize": True,
                  "auto-dismiss": rec.auto_dismiss,
                  "x-blockpull": {"cur": info.cur, "end": info.end,
                                  "copied-bytes": info.copied_bytes,
                                  "zeroed-bytes": info.zeroed_bytes, "errors": info.errors}})
        if rec.error is not None:
            d["error"] = rec.error
        return d

    # ---- clients ------------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = _Client(self, reader, writer)
        self._clients.add(c)
        try:
            await c.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:   # never let one client take the socket down
            log.exception("QMP client")
        finally:
            self._clients.discard(c)
            writer.close()

    def _broadcast(self, event: str, data: Dict[str, Any]) -> None:
        msg = {"timestamp": _timestamp(), "event": event, "data": data}
        for c in list(self._clients):
            if c.negotiated:
                c.send(msg)

    # ---- commands -----------------------------------------------------------------------

    def _find_block_job(self, args: Dict[str, Any]) -> _Record:
        dev = _arg(args, "device", str)
        rec = self._jobs.get(dev)
        if rec is None:
            raise QMPError(f"Block job '{dev}' not found", "DeviceNotActive")
        return rec

    def _find_job(self, args: Dict[str, Any]) -> _Record:
        rec = self._jobs.get(_arg(args, "id", str))
        if rec is None:
            raise QMPError("Job not found")
        return rec

    @staticmethod
    def _verb(rec: _Record, verb: str, allowed: tuple) -> None:
        if rec.status not in allowed:
            raise QMPError(f"Job '{rec.id}' in state '{rec.status}' cannot accept command "
                           f"verb '{verb}'")

    def _pause(self, rec: _Record) -> None:
        self._verb(rec, "pause", ("created", "running", "paused"))
        if rec.user_paused or rec.status == "paused":
            raise QMPError("Job is already paused")
        rec.user_paused = True
        rec.job.pause(wait=False)

    def _resume(self, rec: _Record) -> None:
        self._verb(rec, "resume", ("created", "running", "paused"))
        if not rec.user_paused and rec.status != "paused":
            raise QMPError("Can't resume a job that was not paused")
        rec.user_paused = False
        rec.job.resume()

    def _cancel(self, rec: _Record) -> None:
        self._verb(rec, "cancel", ("created", "running", "paused"))
        rec.user_paused = False
        if rec.status == "paused":     # as in QEMU: the job resumes to see the cancel
            self._status(rec, "running")
        rec.job.abort(wait=False)

    def _dismiss(self, rec: _Record) -> None:
        self._verb(rec, "dismiss", ("concluded",))
        self._status(rec, "null")

    async def _starts_settled(self) -> None:
        """Wait while a pull is being started (planned) on another thread: QEMU answers
        no command in the middle of a block-stream, so a query made meanwhile sees the
        job once it exists, not an empty list."""
        deadline = time.monotonic() + START_WAIT
        while any(not r.started for r in list(self._jobs.values())) and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def execute(self, cmd: str, args: Dict[str, Any]) -> Any:
        if cmd not in ("qmp_capabilities", "query-version", "query-commands"):
            await self._starts_settled()
        if cmd == "query-version":
            _no_args(args)
            from blockpull import __version__
            return {"qemu": dict(QEMU_VERSION), "package": f"blockpull {__version__}"}
        if cmd == "query-commands":
            _no_args(args)
            return [{"name": n} for n in sorted(COMMANDS)]
        if cmd == "query-block-jobs":
            _no_args(args)
            return [self._block_job_info(r) for r in list(self._jobs.values()) if r.started]
        if cmd == "query-jobs":
            _no_args(args)
            out = []
            for r in list(self._jobs.values()):
                if not r.started:
                    continue
                p = self._progress(r, self._info(r))
                d = {"id": r.id, "type": "stream", "status": self._block_job_info(r)["status"],
                     "current-progress": p["offset"], "total-progress": p["len"]}
                if r.error is not None:
                    d["error"] = r.error
                out.append(d)
            return out
        if cmd == "block-stream":
            return await self._block_stream(args)
        if cmd == "block-job-set-speed":
            _only(args, "device", "speed")
            rec = self._find_block_job(args)
            speed = _arg(args, "speed", int)
            if speed < 0:
                raise QMPError("Parameter 'speed' expects a non-negative value")
            self._verb(rec, "set-speed", ("created", "running", "paused"))
            rec.job.set_speed(speed)
            return {}
        if cmd in ("block-job-pause", "block-job-resume", "block-job-cancel",
                   "block-job-dismiss"):
            _only(args, "device", "force") if cmd == "block-job-cancel" else _only(args, "device")
            rec = self._find_block_job(args)
            if cmd == "block-job-pause":
                self._pause(rec)
            elif cmd == "block-job-resume":
                self._resume(rec)
            elif cmd == "block-job-dismiss":
                self._dismiss(rec)
            else:
                force = _arg(args, "force", bool, False)
                if not force and (rec.user_paused or rec.status == "paused"):
                    raise QMPError(f"The block job for device '{rec.id}' is currently paused")
                self._cancel(rec)
            return {}
        if cmd in ("job-pause", "job-resume", "job-cancel", "job-dismiss"):
            _only(args, "id")
            rec = self._find_job(args)
            {"job-pause": self._pause, "job-resume": self._resume,
             "job-cancel": self._cancel, "job-dismiss": self._dismiss}[cmd](rec)
            return {}
        if cmd == "quit":
            _no_args(args)
            if self._on_quit is not None:
                threading.Thread(target=self._on_quit, name="blockpull-qmp-quit",
                                 daemon=True).start()
            return {}
        raise QMPError(f"The command {cmd} has not been found", "CommandNotFound")

    async def _block_stream(self, args: Dict[str, Any]) -> Dict[str, Any]:
        _only(args, "device", "job-id", "base", "base-node", "speed", "on-error",
              "auto-dismiss", "auto-finalize", "backing-file", "bottom", "filter-node-name")
        dev = _arg(args, "device", str)
        if dev != NODE:
            raise QMPError(f"Cannot find device='{dev}' nor node-name='{dev}'")
        job_id = _arg(args, "job-id", str, dev)
        speed = _arg(args, "speed", int, 0)
        if speed < 0:
            raise QMPError("Parameter 'speed' expects a non-negative value")
        on_error = _arg(args, "on-error", str, "report")
        if on_error not in tuple(OnError):
            raise QMPError(f"on-error '{on_error}' is not supported here: use report, stop "
                           f"or ignore")
        if not _arg(args, "auto-finalize", bool, True):
            raise QMPError("auto-finalize false is not supported here")
        for unsupported in ("backing-file", "bottom", "filter-node-name"):
            if unsupported in args:
                raise QMPError(f"Parameter '{unsupported}' is not supported here")
        auto_dismiss = _arg(args, "auto-dismiss", bool, True)
        base = _arg(args, "base", str, None)
        base_node = _arg(args, "base-node", str, None)
        if base is not None and base_node is not None:
            raise QMPError("'base' and 'base-node' cannot be specified at the same time")
        chain = [c.path for c in self.image.chain]
        if base_node is not None:
            depth = int(base_node[7:]) if base_node.startswith("backing") and \
                base_node[7:].isdigit() else -1
            if not 1 <= depth < len(chain):
                raise QMPError(f"Cannot find node '{base_node}' in the backing chain of "
                               f"'{NODE}' (its backing files are backing1..backing"
                               f"{len(chain) - 1})")
            base = chain[depth]
        elif base is not None:
            try:
                self.image.base_depth(base)
            except (BlockpullError, ValueError, OSError):
                raise QMPError(f"Can't find '{base}' in the backing chain") from None
        for r in self._jobs.values():
            if r.job is None or not r.job.done():
                raise QMPError(f"Node '{NODE}' is busy: block device is in use by block job: "
                               f"stream")
        if job_id in self._jobs:
            raise QMPError(f"Job ID '{job_id}' already in use")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, lambda: self.start(
                base=base, bandwidth=speed, on_error=on_error, job_id=job_id,
                auto_dismiss=auto_dismiss))
        except JobActiveError:
            raise QMPError(f"Node '{NODE}' is busy: block device is in use by block job: "
                           f"stream") from None
        except (BlockpullError, ValueError, OSError) as exc:
            raise QMPError(str(exc)) from None
        return {}

    # ---- closing ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop listening, disconnect the clients, remove the socket. Jobs carry on."""
        if self._closed:
            return
        self._closed = True

        async def _shut() -> None:
            self._server.close()
            for c in list(self._clients):
                c.writer.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            try:
                asyncio.run_coroutine_threadsafe(_shut(), self._loop).result(5)
            except Exception:
                log.debug("closing the QMP socket", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> "ControlServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


COMMANDS = ("qmp_capabilities", "query-version", "query-commands", "query-block-jobs",
            "query-jobs", "block-stream", "block-job-set-speed", "block-job-pause",
            "block-job-resume", "block-job-cancel", "block-job-dismiss", "job-pause",
            "job-resume", "job-cancel", "job-dismiss", "quit")

_TYPES = {int: "integer", str: "string", bool: "boolean"}


def _arg(args: Dict[str, Any], name: str, typ: type, default: Any = ...) -> Any:
    if name not in args:
        if default is ...:
            raise QMPError(f"Parameter '{name}' is missing")
        return default
    v = args[name]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise QMPError(f"Invalid parameter type for '{name}', expected: {_TYPES[typ]}")
    return v


def _only(args: Dict[str, Any], *names: str) -> None:
    for k in args:
        if k not in names:
            raise QMPError(f"Parameter '{k}' is unexpected")


def _no_args(args: Dict[str, Any]) -> None:
    _only(args)


class _Client:
    """One connection: JSON framing, negotiation, commands in order, events between."""

    def __init__(self, server: ControlServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.negotiated = False

    def send(self, msg: Dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg).encode() + b"\r\n")

    def _error(self, desc: str, cls: str = "GenericError", mid: Any = None,
               has_id: bool = False) -> None:
        msg: Dict[str, Any] = {"error": {"class": cls, "desc": desc}}
        if has_id:
            msg["id"] = mid
        self.send(msg)

    async def run(self) -> None:
        from blockpull import __version__
        self.send({"QMP": {"version": {"qemu": dict(QEMU_VERSION),
                                       "package": f"blockpull {__version__}"},
                           "capabilities": []}})
        async for raw in _values(self.reader):
            if raw is None:
                self._error("JSON parse error, the message is too long, too deeply nested "
                            "or not a JSON value")
            else:
                await self._message(raw)
            await self.writer.drain()

    async def _message(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self._error(f"JSON parse error, {exc}")
            return
        if not isinstance(msg, dict):
            self._error("QMP input must be a JSON object")
            return
        has_id = "id" in msg
        mid = msg.get("id")
        if "exec-oob" in msg:
            self._error("QMP input member 'exec-oob' is unexpected: out-of-band execution "
                        "is not enabled on this monitor", mid=mid, has_id=has_id)
            return
        for k in msg:
            if k not in ("execute", "arguments", "id"):
                self._error(f"QMP input member '{k}' is unexpected", mid=mid, has_id=has_id)
                return
        cmd = msg.get("execute")
        if not isinstance(cmd, str):
            self._error("QMP input member 'execute' must be a string" if "execute" in msg
                        else "QMP input lacks member 'execute'", mid=mid, has_id=has_id)
            return
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            self._error("QMP input member 'arguments' must be an object", mid=mid,
                        has_id=has_id)
            return
        try:
            if cmd == "qmp_capabilities":
                if self.negotiated:
                    raise QMPError("Capabilities negotiation is already complete, command "
                                   "ignored", "CommandNotFound")
                _only(args, "enable")
                enable = args.get("enable", [])
                if not isinstance(enable, list):
                    raise QMPError("Invalid parameter type for 'enable', expected: array")
                for cap in enable:
                    raise QMPError(f"Capability '{cap}' not available")
                result: Any = {}
                self.negotiated = True
            elif not self.negotiated:
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            else:
                result = await self.server.execute(cmd, args)
        except QMPError as exc:
            self._error(exc.desc, exc.cls, mid, has_id)
            return
        except Exception as exc:   # a bug must answer, not kill the connection
            log.exception("QMP command %s", cmd)
            self._error(f"{cmd} failed: {exc}", "GenericError", mid, has_id)
            return
        reply: Dict[str, Any] = {"return": result}
        if has_id:
            reply["id"] = mid
        self.send(reply)


async def _values(reader: asyncio.StreamReader):
    """Split the stream into top-level JSON values (objects, arrays or bare tokens),
    as QEMU's JSON streamer does; yields None for a value too long or too deep."""
    buf = bytearray()
    depth = 0
    in_str = esc = False
    bad = False
    while True:
        data = await reader.read(65536)
        if not data:
            return
        for b in data:
            if bad:
                # skip to the end of the offending value: the next newline at depth 0
                if b == 0x0A:
                    bad = False
                    buf.clear()
                    depth = 0
                    in_str = esc = False
                continue
            if not buf and depth == 0 and b in b" \t\r\n":
                continue
            buf.append(b)
            if in_str:
                if esc:
                    esc = False
                elif b == 0x5C:
                    esc = True
                elif b == 0x22:
                    in_str = False
            elif b == 0x22:
                in_str = True
            elif b in b"{[":
                depth += 1
            elif b in b"}]":
                depth -= 1
            if len(buf) > MAX_MESSAGE or depth > MAX_DEPTH:
                bad = True
                yield None
                continue
            if depth <= 0 and not in_str:
                if b in b"}]" or (depth == 0 and b in b" \t\r\n"):
                    yield bytes(buf)
                    buf.clear()
                    depth = 0
