"""PullJob: a pull running in the background, and how to watch and steer it."""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, List, NamedTuple, Optional, Union

from blockpull._q2keep import plan as keep_plan
from blockpull._ratelimit import RateLimiter
from blockpull._stream import MAX_READ_DEPTH, Stream
from blockpull.budget import Budget
from blockpull.errors import (ImageFormatError, JobActiveError, PullCancelled, PullError,
                             StreamIOError)
from blockpull.policy import JobStatus, OnError
from blockpull.units import format_size, parse_bandwidth

if TYPE_CHECKING:  # pragma: no cover
    from blockpull.image import Image

log = logging.getLogger("blockpull")

__all__ = ["PullJob", "JobFuture", "PullInfo", "PullEvent", "JobStatus", "OnError",
           "STATUSES"]

#: every value ``PullJob.status`` takes
STATUSES = tuple(JobStatus)

_active_lock = threading.Lock()
_active: dict = {}   # (st_dev, st_ino) of a top image -> its running PullJob


class PullInfo(NamedTuple):
    """A snapshot of a pull's progress.

    ``cur`` bytes of ``end`` processed (``end`` is known from the start and equals ``cur``
    at completion; ``cur`` never exceeds ``end``). A cluster the pull planned to copy that
    a guest write (or a write of zeros, or a copy-on-read) fills first counts as done:
    ``cur`` advances over it and ``end`` stays. ``copied_bytes`` were written as data,
    ``zeroed_bytes`` recorded as zero clusters (or zero data on qcow2 v2); ``errors``
    counts chunks skipped under ``on_error="ignore"``. ``compressed`` is what the pull
    does with the backing's compressed clusters: "keep" (copied into the qcow2 top as
    compressed clusters) or "inflate" (written as plain data, as QEMU's block-stream
    does), and ``compressed_reason`` one sentence saying why (e.g. why "keep" was asked
    for and could not be done); ``kept_bytes`` of ``copied_bytes`` were kept compressed.
    """
    cur: int
    end: int
    bandwidth: int
    status: str
    copied_bytes: int
    zeroed_bytes: int
    errors: int
    elapsed: float
    path: str
    base: Optional[str]
    compressed: str = "inflate"
    compressed_reason: str = ""
    kept_bytes: int = 0


class PullEvent(NamedTuple):
    """What ``on_event`` receives: ``kind`` is one of "completed", "failed", "cancelled"
    (exactly one of these per job, last), "paused", "resumed", "error"."""
    kind: str
    job: "PullJob"
    info: PullInfo
    error: Optional[PullError] = None


class JobFuture:
    """The end of a pull job and the ways to wait for it, shared by ``PullJob`` and the job
    that steers QEMU's pull (``blockpull.qemu``). A subclass sets ``_status``, ``_error``,
    ``_done`` (a threading.Event), ``_callbacks`` and ``_cb_lock``, and gives ``_name``
    (the image or device, for messages) and ``_final_info()``."""

    _status: str          # a JobStatus, or its word
    _error: Optional[PullError]
    _done: threading.Event
    _callbacks: List[Callable[[Any], None]]
    _cb_lock: threading.Lock
    _name: str

    def _final_info(self) -> PullInfo:
        raise NotImplementedError

    @property
    def status(self) -> str:
        """"running", "paused", "completed", "failed" or "cancelled" (a JobStatus, which
        equals the word)."""
        return self._status

    @property
    def error(self) -> Optional[PullError]:
        """The error that failed the job, if it failed."""
        return self._error

    def done(self) -> bool:
        """True once the job has completed, failed or been cancelled."""
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the job to end; False if ``timeout`` seconds passed first."""
        return self._done.wait(timeout)

    def result(self, timeout: Optional[float] = None) -> PullInfo:
        """The final PullInfo; raises PullError if the job failed, PullCancelled if it was
        aborted, TimeoutError if it is still running after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self._name}: pull still running")
        if self._status == JobStatus.CANCELLED:
            raise PullCancelled(f"{self._name}: pull was aborted; the image is valid and "
                                f"still backed, pull again to resume")
        if self._error is not None:
            raise self._error
        return self._final_info()

    def _run_callback(self, fn: Callable[[Any], None]) -> None:
        try:
            fn(self)
        except Exception:
            log.exception("done callback of the pull of %s raised", self._name)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Call ``fn(job)`` when the job ends (at once, here, if it already has)."""
        with self._cb_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        self._run_callback(fn)

    def __await__(self) -> Generator[Any, None, PullInfo]:
        import asyncio
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def _set() -> None:
            if not fut.done():
                fut.set_result(None)

        def _done(_job: Any) -> None:
            loop.call_soon_threadsafe(_set)
        self.add_done_callback(_done)
        yield from fut.__await__()
        return self.result(0)


def _refuse_narrow_refcounts(image: "Image") -> None:
    """Raise ImageFormatError when the top is qcow2 with internal snapshots and its
    refcounts (``refcount_bits`` wide; QEMU's docs/interop/qcow2.rst, "Header",
    refcount_order) cannot count a copied cluster once in each view (the image and each
    snapshot) that lacks it, as a pull links it: nothing is written."""
    top = image.layers[0]
    order = getattr(top, "refcount_order", None)
    views = 1 + int(getattr(top, "nb_snapshots", 0) or 0)
    if order is None or views == 1:
        return
    bits = 1 << order
    if bits < 64 and views > (1 << bits) - 1:
        raise ImageFormatError(
            f"{image.path}: a pull links each copied cluster into the image and its "
            f"{views - 1} internal snapshots, a refcount of up to {views}, more than its "
            f"{bits}-bit refcounts hold: widen them with 'qemu-img amend -o "
            f"refcount_bits=16' (or delete snapshots)")


class PullJob(JobFuture):
    """A pull running on its own thread. Get one from ``Image.pull()``.

    Callbacks (``on_event``, ``add_done_callback``) run on the job's thread: keep them
    short, and do not call ``wait``/``abort(wait=True)`` of the same job from them.
    """

    def __init__(self, image: "Image", base_depth: int, base: Optional[str],
                 bandwidth: int, on_error: OnError,
                 on_event: Optional[Callable[[PullEvent], None]],
                 chunk: Optional[int] = None, batch: Optional[int] = None,
                 budget: "Optional[Budget]" = None,
                 read_depth: Optional[int] = None, compressed: str = "inflate") -> None:
        self.image = image
        self.path = image.path
        self._name = self.path
        self.base = base
        self.on_error = on_error
        self._on_event = on_event
        self._base_depth = base_depth
        self.budget = budget
        self._limiter = (RateLimiter(bandwidth) if budget is None
                         else budget.job_limiter(bandwidth))
        self._stream = Stream(image.chain_obj, image.layers[0], image.lock, base_depth,
                              self._limiter, control=self)
        if chunk:
            self._stream.chunk = int(chunk)
        if batch:
            self._stream.batch = int(batch)
        if read_depth:
            self._stream.read_depth = int(read_depth)
        self._compressed = compressed
        self._keep = keep_plan(image.chain_obj, image.layers[0], base_depth, "inflate")
        self._status = JobStatus.RUNNING
        self._error: Optional[PullError] = None
        self._last_error: Optional[PullError] = None
        self._done = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._resumed = False   # resume() was called since the last pause
        self._parked = threading.Event()
        self._callbacks: List[Callable[["PullJob"], None]] = []
        self._cb_lock = threading.Lock()
        self._t0 = time.monotonic()
        self._t1: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self._key: Any = None

    # ---- starting ---------------------------------------------------------------

    @classmethod
    def create(cls, image: "Image", base: Optional[str] = None,
               bandwidth: Union[int, str] = 0, on_error: str = "report",
               on_event: Optional[Callable[[PullEvent], None]] = None,
               chunk: Optional[int] = None, batch: Optional[int] = None,
               budget: "Optional[Budget]" = None,
               read_depth: Optional[int] = None,
               compressed: str = "inflate") -> "PullJob":
        """A pull of ``image`` down to ``base``, set up but not started (``Image.pull``
        calls this, makes it the image's job, then calls ``start``).

        ``bandwidth`` is bytes/s (0 = unlimited; "50M" = 50 MiB/s), the job's own limit;
        ``budget`` (a ``blockpull.Budget``) is a bandwidth the job shares with every other
        job started with it, the job's own limit applying inside it; ``chunk`` (bytes
        copied per step), ``batch`` (bytes between metadata syncs) and ``read_depth``
        (chunk reads of the backing chain in flight at once, default 4) tune the copy loop.
        ``compressed``: "inflate" (the default, as QEMU) writes the backing's compressed
        clusters as plain data; "keep" copies them into a qcow2 top as compressed
        clusters where the formats allow (same cluster size; the top's compression type
        is set to the backing's if it holds no compressed cluster yet), else inflates;
        ``info().compressed`` and ``compressed_reason`` say which and why.
        Raises ValueError (bad on_error, bandwidth, read_depth or compressed), TypeError (``budget`` is
        not a Budget), PermissionError (image open read-only), JobActiveError (a pull
        already runs on the image), BackingChainError (``base`` is not in the chain),
        ImageFormatError (a qcow2 top with internal snapshots whose refcounts are too
        narrow to count a copied cluster once per view lacking it). The image is claimed until the job ends, or until ``start`` fails."""
        policy = OnError.parse(on_error)
        if compressed not in ("inflate", "keep"):
            raise ValueError(f"compressed must be 'inflate' or 'keep', not {compressed!r}")
        bw = parse_bandwidth(bandwidth)
        if read_depth is not None and not 1 <= read_depth <= MAX_READ_DEPTH:
            raise ValueError(f"read_depth must be 1 to {MAX_READ_DEPTH} (chunk reads in "
                             f"flight), not {read_depth}")
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget= takes a blockpull.Budget shared by pulls, not "
                            f"{budget!r}; for this pull's own limit give bandwidth=")
        if image.readonly:
            raise PermissionError(f"{image.path}: open the image read-write to pull into it")
        _refuse_narrow_refcounts(image)
        key = image.layers[0].file.identity()
        with _active_lock:
            other = _active.get(key)
            if other is not None and not other.done():
                raise JobActiveError(f"{image.path}: a pull is already running on this image; "
                                     f"wait for it or abort it first")
            base_depth = image.base_depth(base)
            job = cls(image, base_depth, base, bw, policy, on_event, chunk, batch, budget,
                      read_depth, compressed)
            job._key = key
            _active[key] = job
        return job

    def start(self) -> None:
        """Plan the pull (from here on, writes into the image count toward its progress)
        and start its thread. If planning fails (OSError reading the tables), the claim
        on the image is released and the error raised: the job never runs."""
        try:
            if self._compressed == "keep":
                with self.image.lock:
                    self._keep = keep_plan(self.image.chain_obj, self.image.layers[0],
                                           self._base_depth, "keep")
                    # the top's compression type, durable before any cluster of it
                    self._keep.apply(self.image.layers[0])
                if self._keep.mode == "keep":
                    self._stream.keep = self._keep
            self._stream.prepare()
        except BaseException:
            with _active_lock:
                _active.pop(self._key, None)
            raise
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"blockpull-pull:{os.path.basename(self.path)}")
        self._thread.start()
        log.info("pull of %s started: %d bytes to copy, base %s, bandwidth %s",
                 self.path, self._stream.end, self.base, self._limiter.rate or "unlimited")

    @property
    def stream(self) -> Stream:
        """The copy loop (``blockpull._stream.Stream``): the image tells it of the writes
        it makes during the pull; for the package and for tests."""
        return self._stream

    def in_job_thread(self) -> bool:
        """True when called from the job's own thread (from an event or done callback)."""
        return threading.current_thread() is self._thread

    # ---- the job's thread ---------------------------------------------------------

    def _run(self) -> None:
        kind = JobStatus.FAILED
        try:
            result = self._stream.run()
            if result == "cancelled":
                kind = JobStatus.CANCELLED
            elif self._last_error is not None:
                self._error = PullError(
                    f"{self.path}: pull finished with {self._stream.errors} unreadable or "
                    f"unwritable chunk(s); the backing file is kept: {self._last_error}",
                    self._last_error.errno, self._last_error.operation, self._last_error.offset)
            elif self._finish() == "cancelled":
                kind = JobStatus.CANCELLED
            else:
                kind = JobStatus.COMPLETED
        except StreamIOError as exc:
            self._error = self._pull_error(exc)
        except Exception as exc:  # an unexpected failure still ends the job cleanly
            log.exception("pull of %s failed", self.path)
            self._error = PullError(f"{self.path}: pull failed: {exc}",
                                    getattr(exc, "errno", None), None, None)
        self._t1 = time.monotonic()
        self._status = kind
        log.info("pull of %s %s", self.path, kind)
        with _active_lock:
            if _active.get(self._key) is self:
                del _active[self._key]
        self._done.set()
        self._parked.set()
        self._emit(kind, self._error)
        with self._cb_lock:
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._run_callback(fn)

    def _finish(self) -> str:
        """Make the copy durable and change the backing link, under the on_error policy:
        an I/O error here fails the job ("report", and "ignore", which has nothing left
        to carry on with) or pauses it until resumed, then tries again ("stop").

        A failed fdatasync gives back what was linked since the last good one (its data
        may never have reached the disk), so after one (here, or a guest's flush since
        the copy loop began) the copy loop runs again before the link changes."""
        while True:
            try:
                with self.image.lock:
                    if self._stream.intact():
                        self._stream.finish_sync()
                        if self._stream.intact():
                            self._relink()
                            return "completed"
            except OSError as exc:
                err = StreamIOError(exc, "write", 0)
                if self.on_io_error(err) != OnError.STOP:
                    raise err from exc
                if self._stream.cancel_requested:
                    return "cancelled"
            # copy again what the failed sync gave back
            if self._stream.run() == "cancelled":
                return "cancelled"

    def _relink(self) -> None:
        """After a complete, durable copy (the image lock held): point the top at the
        base (or at nothing) and drop the images it no longer needs from the chain. The
        header change is the driver's crash-safe ``set_backing``."""
        depth = self._base_depth
        if depth == 1:
            return  # the base is the immediate backing: nothing to change
        layers = self.image.layers
        top = layers[0]
        if depth >= len(layers):
            top.set_backing(None, None)
        else:
            top.set_backing(self.image.backing_name_for(depth), layers[depth].format)
        self.image.drop_backings(depth)

    def _pull_error(self, exc: StreamIOError) -> PullError:
        if exc.errno == errno.ENOSPC and exc.operation == "write":
            left = max(0, self._stream.end - self._stream.cur)
            then = "resume the job" if self.on_error == OnError.STOP else \
                "pull again to resume"
            top = self.image.layers[0]
            # the copies land in the external data file where there is one
            holder = top.data_file if top.data_file is not None else top.file
            if holder.is_device:
                # a device does not grow: room means a larger device
                full = "no space left on its block device"
                room = "grow the device (lvextend, say) by"
            else:
                full = "no space left on its file system"
                room = "make room for"
            return PullError(f"{self.path}: {full} (writing at offset {exc.offset}); what "
                             f"was copied is kept and the image is intact and still backed: "
                             f"{room} about {format_size(left)} more and {then}",
                             exc.errno, exc.operation, exc.offset)
        what = "reading the backing chain" if exc.operation == "read" else "writing the image"
        # (under "stop" the job waits, paused, for resume(): a new pull would be refused)
        then = "resume the job to retry" if self.on_error == OnError.STOP else \
            "pull again to resume"
        return PullError(f"{self.path}: I/O error {what} at offset {exc.offset}: "
                         f"{getattr(exc.exc, 'strerror', None) or exc}; the image is intact "
                         f"and still backed, {then}",
                         exc.errno, exc.operation, exc.offset)

    def _emit(self, kind: str, error: Optional[PullError] = None) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(PullEvent(kind, self, self.info(), error))
        except Exception:
            log.exception("on_event callback of the pull of %s raised", self.path)

    def _final_info(self) -> PullInfo:
        return self.info()

    # the Stream's control interface
    def wait_while_paused(self) -> None:
        """Called by the copy loop when a pause was asked for. Emits "paused", then
        "resumed" once ``resume()`` was called, even when an ``abort()`` follows at once
        (the job then ends "cancelled"); an abort without a resume emits no "resumed"."""
        self._status = JobStatus.PAUSED
        self._parked.set()
        self._emit("paused")
        while not self._resume.wait(0.5):
            if self._stream.cancel_requested:
                break
        self._parked.clear()
        if self._resumed or not self._stream.cancel_requested:
            self._resumed = False
            self._status = JobStatus.RUNNING
            self._emit("resumed")

    def on_io_error(self, exc: StreamIOError) -> OnError:
        """Called by the copy loop on an I/O error; applies the job's policy and returns
        it: REPORT (the loop fails), IGNORE (it gives the chunk up), STOP (the job paused
        here until resumed: the loop tries the chunk again)."""
        err = self._pull_error(exc)
        self._last_error = err
        if self.on_error == OnError.REPORT:
            return OnError.REPORT
        self._emit("error", err)
        if self.on_error == OnError.IGNORE:
            return OnError.IGNORE
        # "stop": pause until resumed, then retry the chunk
        self._resumed = False
        self._resume.clear()
        self._stream.pause_requested = True
        self.wait_while_paused()
        self._last_error = None
        return OnError.STOP

    # ---- watching -----------------------------------------------------------------

    def info(self) -> PullInfo:
        """Progress now: cheap enough to poll thousands of times a second."""
        s = self._stream
        t1 = self._t1
        return PullInfo(s.cur, s.end, self._limiter.rate, self._status, s.copied, s.zeroed,
                        s.errors, (t1 if t1 is not None else time.monotonic()) - self._t0,
                        self.path, self.base, self._keep.mode, self._keep.reason, s.kept)

    # ---- steering -----------------------------------------------------------------

    def set_speed(self, bandwidth: Union[int, str]) -> None:
        """Change the limit in bytes/s (0 = unlimited; "50M" = 50 MiB/s) at once."""
        self._limiter.set_rate(parse_bandwidth(bandwidth))

    def pause(self, wait: bool = True) -> None:
        """Stop copying after the chunk in flight; ``resume()`` carries on."""
        if self.done():
            return
        self._resumed = False
        self._resume.clear()
        self._stream.pause_requested = True
        self._limiter.wake()
        if wait:
            while not self.done() and not self._parked.wait(0.1):
                pass

    def resume(self) -> None:
        """Carry on after ``pause()`` (or after an error under on_error="stop"); the job
        emits "resumed" if it had paused."""
        self._resumed = True
        self._stream.pause_requested = False
        self._resume.set()

    def abort(self, wait: bool = True) -> None:
        """Cancel the pull. The image stays valid and still backed; what was copied stays
        and a later pull copies only the rest."""
        self._stream.cancel_requested = True
        self._resume.set()
        self._limiter.wake()
        if wait and threading.current_thread() is not self._thread:
            self._done.wait()

    def __repr__(self) -> str:
        i = self.info()
        return f"<PullJob {self.path!r} {i.status} {i.cur}/{i.end}>"

