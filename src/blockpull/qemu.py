"""Steer QEMU's own pull: the PullJob interface over QMP's ``block-stream``.

When a running QEMU (or a qemu-storage-daemon) holds a disk, blockpull cannot open it (the
image lock says so) and must not; it can still start and steer QEMU's stream job through
QMP, the QEMU Machine Protocol. ``pull()`` returns a ``QemuPullJob`` with the methods and
events of a local ``PullJob``.

Needs the ``qemu.qmp`` package (``pip install blockpull[qmp]``). The commands and events
used are QEMU's (qapi/block-core.json: ``block-stream``, ``query-block-jobs``,
``block-job-set-speed``/``-pause``/``-resume``/``-cancel``, ``BLOCK_JOB_COMPLETED``,
``BLOCK_JOB_CANCELLED``, ``BLOCK_JOB_ERROR``; qapi/job.json: ``JOB_STATUS_CHANGE``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno as _errno
import itertools
import logging
import os
import queue
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from blockpull.errors import (BackingChainError, BlockpullError, JobActiveError, PullError,
                              QemuError)
from blockpull.job import JobFuture, PullEvent, PullInfo
from blockpull.policy import OnError
from blockpull.units import parse_bandwidth

log = logging.getLogger("blockpull")

__all__ = ["pull", "QemuPullJob"]

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")   # QEMU's id_wellformed()
_ids = itertools.count()
# QEMU reports a job's failure as strerror(errno): map it back to the errno
_STRERROR = {os.strerror(n): n for n in sorted(_errno.errorcode, reverse=True)}


def _qmp() -> Any:
    try:
        import qemu.qmp as qmp
    except ImportError as exc:   # pragma: no cover - the extra is installed in CI
        raise QemuError("steering QEMU needs the qemu.qmp package: pip install "
                        "'blockpull[qmp]'") from exc
    return qmp


def _execute_error(exc: Any, what: str) -> BlockpullError:
    """A QMP error reply as the blockpull exception that names it."""
    cls = getattr(exc, "error_class", None)
    desc = str(exc)
    msg = f"{what}: QEMU refused: {desc} ({cls})"
    if "is busy" in desc or "already in use" in desc or "in use by" in desc:
        return JobActiveError(f"{msg}; wait for the running job or cancel it first")
    if "in the backing chain" in desc:
        return BackingChainError(f"{msg}; give base as the chain names it "
                                 f"(see query-named-block-nodes) or base_node")
    return QemuError(msg, cls, desc)


class QemuPullJob(JobFuture):
    """A stream job running in QEMU, steered over QMP. Get one from ``pull()``.

    The interface is ``PullJob``'s: ``info()``, ``set_speed``, ``pause``, ``resume``,
    ``abort``, ``wait``, ``result``, ``done()``, ``status``, ``error``,
    ``add_done_callback``, ``await job``, and ``on_event`` events of the same kinds
    ("completed", "failed", "cancelled" exactly once and last; "paused", "resumed",
    "error"). ``info().cur``/``.end`` are QEMU's ``offset``/``len`` in bytes (QEMU counts
    every byte of the device it has processed, copied or not, so ``copied_bytes`` is
    ``cur`` and ``zeroed_bytes`` 0). Each ``info()`` is one QMP round trip.

    Callbacks run on the job's event thread (not QEMU's, not the caller's): they may call
    ``info()``, ``set_speed``, ``pause(wait=False)``, ``resume``, ``abort(wait=False)``.
    The job keeps its own QMP connection until the job ends, then disconnects.
    """

    def __init__(self, address: Any, device: str, job_id: str, base: Optional[str],
                 base_node: Optional[str], on_event: Optional[Callable[[PullEvent], None]],
                 timeout: float) -> None:
        self.path = device
        self.device = device
        self._name = device
        self.job_id = job_id
        self.base = base if base is not None else base_node
        self._address = address
        self._timeout = timeout
        self._on_event = on_event
        self._status = "running"
        self._error: Optional[PullError] = None
        self._final: Optional[PullInfo] = None
        self._last: Tuple[int, int, int] = (0, 0, 0)   # offset, len, speed last seen
        self._errors = 0
        self._last_op: Optional[str] = None
        self._ended = False                  # the terminal event was seen (loop thread)
        self._done = threading.Event()
        self._paused = threading.Event()
        self._callbacks: List[Callable[["QemuPullJob"], None]] = []
        self._cb_lock = threading.Lock()
        self._t0 = time.monotonic()
        self._t1: Optional[float] = None
        self._events: "queue.Queue[Optional[Tuple[str, Optional[PullError], Optional[PullInfo]]]]" \
            = queue.Queue()
        self._client: Any = None
        self._tasks: List[asyncio.Task] = []
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                             name=f"blockpull-qmp:{job_id}")
        self._event_thread = threading.Thread(target=self._dispatch, daemon=True,
                                              name=f"blockpull-qemu-job:{job_id}")

    # ---- plumbing ---------------------------------------------------------------------

    def _call(self, coro: Any) -> Any:
        if not self._loop_thread.is_alive() or self._loop.is_closed():
            coro.close()
            raise QemuError(f"{self.device}: the QMP connection is closed (the job ended)",
                            None, "closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        deadline = time.monotonic() + self._timeout
        while not fut.done():
            if not self._loop_thread.is_alive() or time.monotonic() > deadline:
                fut.cancel()
                raise QemuError(f"{self.device}: no answer from QEMU within {self._timeout} s",
                                None, "timeout")
            concurrent.futures.wait([fut], 0.1)
        return fut.result()

    async def _connect(self) -> None:
        qmp = _qmp()
        self._client = qmp.QMPClient(f"blockpull-{self.job_id}")
        try:
            await asyncio.wait_for(self._client.connect(self._address), self._timeout)
        except (OSError, asyncio.TimeoutError, qmp.QMPError) as exc:
            raise QemuError(f"cannot connect to QMP at {self._address}: {exc}; give the path "
                            f"of a free QMP socket (QEMU -qmp unix:PATH,server=on,wait=off)",
                            None, str(exc)) from exc
        listener = qmp.EventListener(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                                      "BLOCK_JOB_ERROR", "JOB_STATUS_CHANGE"))
        self._client.register_listener(listener)
        self._tasks = [asyncio.ensure_future(self._listen(listener)),
                       asyncio.ensure_future(self._watch())]

    async def _execute(self, cmd: str, args: Optional[Dict[str, Any]] = None) -> Any:
        qmp = _qmp()
        try:
            return await self._client.execute(cmd, args)
        except qmp.ExecuteError as exc:
            raise _execute_error(exc, f"{self.device}: {cmd}") from None
        except qmp.QMPError as exc:
            raise QemuError(f"{self.device}: {cmd}: the QMP connection failed: {exc}",
                            None, str(exc)) from exc

    async def _listen(self, listener: Any) -> None:
        async for ev in listener:
            data = ev.get("data", {})
            name = ev["event"]
            if name == "JOB_STATUS_CHANGE":
                if data.get("id") != self.job_id or self._ended:
                    continue
                st = data.get("status")
                if st == "paused":
                    self._status = "paused"
                    self._paused.set()
                    self._events.put(("paused", None, None))
                elif st == "running" and self._paused.is_set():
                    self._paused.clear()
                    self._status = "running"
                    self._events.put(("resumed", None, None))
                continue
            if data.get("device") != self.job_id or self._ended:
                continue
            if name == "BLOCK_JOB_ERROR":
                self._errors += 1
                self._last_op = data.get("operation")
                err = PullError(f"{self.device}: QEMU hit an I/O error "
                                f"{'reading' if self._last_op == 'read' else 'writing'} "
                                f"(action {data.get('action')})", None, self._last_op, None)
                if data.get("action") != "report":   # as a local job: "report" just fails
                    self._events.put(("error", err, None))
                continue
            self._last = (data.get("offset", 0), data.get("len", 0), data.get("speed", 0))
            if name == "BLOCK_JOB_CANCELLED":
                self._end("cancelled", None)
            elif "error" in data:
                desc = data["error"]
                self._end("failed", PullError(
                    f"{self.device}: QEMU's pull failed: {desc}; the image is intact and still "
                    f"backed, pull again to resume", _STRERROR.get(desc), self._last_op, None))
            else:
                self._end("completed", None)

    async def _watch(self) -> None:
        """Fail the job if the QMP connection drops before its end (QEMU quit or died)."""
        qmp = _qmp()
        while True:
            state = await self._client.runstate_changed()
            if state != qmp.Runstate.RUNNING:
                break
        if not self._ended:
            self._end("failed", PullError(
                f"{self.device}: lost the QMP connection to QEMU before the pull ended; "
                f"query QEMU (query-block-jobs) for the job {self.job_id!r}"))

    def _end(self, kind: str, error: Optional[PullError]) -> None:
        # on the loop thread, once
        self._ended = True
        self._t1 = time.monotonic()
        self._error = error
        cur, end, speed = self._last
        self._final = PullInfo(cur, end, speed, kind, cur, 0, self._errors,
                               self._t1 - self._t0, self.path, self.base)
        self._events.put((kind, error, self._final))
        self._events.put(None)

    def _dispatch(self) -> None:
        """The event thread: on_event callbacks in order, then the end of the job."""
        while True:
            item = self._events.get()
            if item is None:
                break
            kind, error, info = item
            if kind in ("completed", "failed", "cancelled"):
                self._status = kind
            if self._on_event is not None:
                try:
                    self._on_event(PullEvent(kind, self, info or self.info(), error))  # type: ignore[arg-type]
                except Exception:
                    log.exception("on_event callback of QEMU's pull of %s raised", self.device)
        self._paused.clear()
        self._shutdown()
        with self._cb_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._run_callback(fn)

    def _shutdown(self) -> None:
        async def _close() -> None:
            for t in self._tasks:
                t.cancel()
            try:
                await self._client.disconnect()
            except Exception:   # the connection may be gone already
                pass
        try:
            if self._client is not None:
                self._call(_close())
        except Exception:
            log.debug("closing the QMP connection of %s", self.device, exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        if not self._loop_thread.is_alive():
            self._loop.close()

    # ---- watching -----------------------------------------------------------------

    def info(self) -> PullInfo:
        """Progress now, from ``query-block-jobs``: cur/end are QEMU's offset/len (bytes),
        bandwidth its speed (bytes/s). After the end, the final values."""
        if self._final is not None:
            return self._final
        try:
            jobs = self._call(self._execute("query-block-jobs"))
        except BlockpullError:
            jobs = []
        for j in jobs:
            if j.get("device") == self.job_id:
                self._last = (j.get("offset", 0), j.get("len", 0), j.get("speed", 0))
        final = self._final
        if final is not None:
            return final
        cur, end, speed = self._last
        return PullInfo(cur, end, speed, self._status, cur, 0, self._errors,
                        time.monotonic() - self._t0, self.path, self.base)

    def _final_info(self) -> PullInfo:
        assert self._final is not None
        return self._final

    # ---- steering -----------------------------------------------------------------

    def _steer(self, cmd: str, args: Dict[str, Any], *tolerated: str) -> None:
        if self._ended:
            return
        try:
            self._call(self._execute(cmd, dict(args, device=self.job_id)))
        except QemuError as exc:
            # the job ended meanwhile, or the state already is what was asked for
            if self._ended or exc.error_class == "DeviceNotActive" \
                    or any(t in exc.desc for t in tolerated):
                return
            raise

    def set_speed(self, bandwidth: Union[int, str]) -> None:
        """Change QEMU's limit (``block-job-set-speed``) in bytes/s, 0 = unlimited;
        "50M" = 50 MiB/s."""
        self._steer("block-job-set-speed", {"speed": parse_bandwidth(bandwidth)})

    def pause(self, wait: bool = True) -> None:
        """``block-job-pause``; with ``wait``, until QEMU reports the job paused."""
        self._steer("block-job-pause", {}, "already paused")
        if wait and threading.current_thread() is not self._event_thread:
            while not self._done.is_set() and not self._paused.wait(0.05):
                pass

    def resume(self) -> None:
        """``block-job-resume`` (also after an error under on_error="stop")."""
        self._steer("block-job-resume", {}, "not paused")

    def abort(self, wait: bool = True) -> None:
        """``block-job-cancel`` (forced, so a paused job stops too). QEMU keeps the image
        valid and still backed; what was copied stays."""
        self._steer("block-job-cancel", {"force": True})
        if wait and threading.current_thread() is not self._event_thread:
            self._done.wait()

    def __repr__(self) -> str:
        return f"<QemuPullJob {self.device!r} job {self.job_id!r} {self._status}>"


def pull(qmp_socket: Union[str, "os.PathLike[str]", Tuple[str, int]], device_or_node: str,
         base: Optional[str] = None, bandwidth: Union[int, str] = 0, on_error: str = "report",
         on_event: Optional[Callable[[PullEvent], None]] = None, *,
         base_node: Optional[str] = None, job_id: Optional[str] = None,
         timeout: float = 30.0) -> QemuPullJob:
    """Start QEMU's ``block-stream`` on ``device_or_node`` and return its ``QemuPullJob``.

    ``qmp_socket``: the path of a QMP Unix socket (or a (host, port) pair) that no other
    client holds. ``base``: the backing file name (as the chain records it) that stays as
    the new backing, or ``base_node`` its node name; neither pulls the whole chain.
    ``bandwidth``: bytes/s (0 = unlimited; "50M" = 50 MiB/s). ``on_error``: "report",
    "stop" or "ignore", QEMU's policies of the same names. ``job_id``: QEMU's job id,
    ``device_or_node`` by default (QEMU needs one for a node without a device).
    ``timeout``: seconds to wait for each QMP reply.

    Raises QemuError (cannot connect; QEMU refused: ``.error_class``, ``.desc``),
    JobActiveError (the node is busy with another job), BackingChainError (no such base),
    ValueError (bad on_error or bandwidth).
    """
    on_error = OnError.parse(on_error)
    if base is not None and base_node is not None:
        raise ValueError("give base (a file name) or base_node (a node name), not both")
    bw = parse_bandwidth(bandwidth)
    if job_id is None:
        job_id = device_or_node if _ID.match(device_or_node) else f"blockpull{next(_ids)}"
    address: Any = qmp_socket if isinstance(qmp_socket, tuple) else os.fspath(qmp_socket)
    job = QemuPullJob(address, device_or_node, job_id, base, base_node, on_event, timeout)
    args: Dict[str, Any] = {"device": device_or_node, "job-id": job_id, "on-error": on_error}
    if bw:
        args["speed"] = bw
    if base is not None:
        args["base"] = os.fspath(base)
    if base_node is not None:
        args["base-node"] = base_node
    job._loop_thread.start()
    try:
        job._call(job._connect())
        job._call(job._execute("block-stream", args))
    except BaseException:
        job._ended = True
        job._shutdown()
        raise
    job._event_thread.start()
    log.info("QEMU's pull of %s started as job %s over %s", device_or_node, job_id, address)
    return job
