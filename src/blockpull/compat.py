"""The libvirt-shaped functions: block_pull, get_block_pull_info, block_pull_abort,
block_job_set_speed and event registration, over a per-process registry of pulls.

Paths are the registry's keys (compared as absolute paths). ``get_block_pull_info``,
``block_pull_abort`` and ``block_job_set_speed`` also take a job object in place of a path:
a ``PullJob`` or a ``blockpull.qemu`` job steering QEMU's pull. The registry keeps each image
open while its pull runs and closes it when the pull ends. Event callbacks run on the
pull's thread as ``callback(path, status)`` with one of the BLOCK_PULL_* statuses.
"""
from __future__ import annotations

import itertools
import os
import threading
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from blockpull.budget import Budget
from blockpull.errors import BlockpullError
from blockpull.image import Image
from blockpull.job import PullEvent, PullJob

__all__ = [
    "BLOCK_PULL_COMPLETED", "BLOCK_PULL_FAILED", "BLOCK_PULL_CANCELED",
    "BLOCK_PULL_BANDWIDTH_BYTES", "BLOCK_JOB_SPEED_BANDWIDTH_BYTES", "EVENT_ID_BLOCK_PULL",
    "BlockPullInfo", "block_pull", "get_block_pull_info", "block_pull_abort",
    "block_job_set_speed", "event_register", "event_deregister",
]

BLOCK_PULL_COMPLETED = 0
BLOCK_PULL_FAILED = 1
BLOCK_PULL_CANCELED = 2
#: flag: ``bandwidth`` is in bytes/s instead of MiB/s
BLOCK_PULL_BANDWIDTH_BYTES = 1 << 6
BLOCK_JOB_SPEED_BANDWIDTH_BYTES = 1 << 0
EVENT_ID_BLOCK_PULL = 1

_STATUS = {"completed": BLOCK_PULL_COMPLETED, "failed": BLOCK_PULL_FAILED,
           "cancelled": BLOCK_PULL_CANCELED}


class BlockPullInfo(NamedTuple):
    """Progress of the pull on a path: bytes done and bytes in all."""
    cur: int
    end: int


_lock = threading.Lock()
_jobs: Dict[str, Tuple[Image, PullJob, threading.Event]] = {}   # ... and "image closed"
_callbacks: Dict[int, Callable[[str, int], None]] = {}
_ids = itertools.count(1)


def _key(path: str) -> str:
    return os.path.realpath(os.fspath(path))


def _dispatch(event: PullEvent) -> None:
    status = _STATUS.get(event.kind)
    if status is None:
        return
    # the job has ended: release the image (and its locks) before anyone hears of it,
    # so that a callback may start the next pull on the same path at once
    event.job.image.close()
    with _lock:
        cbs = list(_callbacks.values())
    for cb in cbs:
        try:
            cb(event.job.path, status)
        except Exception:  # one bad callback must not starve the others
            import logging
            logging.getLogger("blockpull").exception("block pull event callback raised")


def _entry(path: str) -> Tuple[Image, PullJob, threading.Event]:
    with _lock:
        entry = _jobs.get(_key(path))
    if entry is None:
        raise BlockpullError(f"{path}: no block pull has run on this path in this process")
    return entry


def _is_job(obj: Any) -> bool:
    return not isinstance(obj, (str, bytes, os.PathLike)) and hasattr(obj, "info") \
        and hasattr(obj, "abort")


def _job(path: Any) -> Any:
    if _is_job(path):
        return path
    return _entry(path)[1]


def _bytes_per_second(bandwidth: int, in_bytes: bool) -> int:
    """libvirt's bandwidth (a whole number of MiB/s, or of bytes/s) in bytes/s. A fraction
    is refused: cut to a whole number, 0.5 MiB/s would become 0, which means unlimited."""
    bw = int(bandwidth)
    if bw != bandwidth and not isinstance(bandwidth, str):
        unit = "bytes/s" if in_bytes else "MiB/s (or bytes/s with the BANDWIDTH_BYTES flag)"
        raise ValueError(f"bandwidth {bandwidth!r} is not a whole number of {unit}")
    return bw if in_bytes else bw << 20


def block_pull(path: str, bandwidth: int = 0, flags: int = 0,
               budget: "Optional[Budget]" = None, compressed: str = "inflate") -> int:
    """Start pulling the whole backing chain of ``path`` into it; returns 0.

    ``bandwidth`` is in MiB/s (0 = unlimited), or in bytes/s with
    ``flags=BLOCK_PULL_BANDWIDTH_BYTES``. ``budget`` (a ``blockpull.Budget``, beyond
    libvirt's signature) shares one bandwidth among every pull started with it;
    ``compressed="keep"`` (also beyond it) keeps compressed clusters compressed where the
    formats allow (see ``PullJob.create``). Raises ValueError for a negative or
    fractional bandwidth, or another ``compressed``.
    """
    bw = _bytes_per_second(bandwidth, bool(flags & BLOCK_PULL_BANDWIDTH_BYTES))
    key = _key(path)
    img = Image(path)
    try:
        job = img.pull(bandwidth=bw, on_event=_dispatch, budget=budget, compressed=compressed)
    except BaseException:
        img.close()
        raise
    closed = threading.Event()

    def _close(_job: PullJob) -> None:   # _dispatch has closed it already, if it ran
        try:
            img.close()
        finally:
            closed.set()
    job.add_done_callback(_close)
    with _lock:
        _jobs[key] = (img, job, closed)
    return 0


def get_block_pull_info(path: Any) -> BlockPullInfo:
    """cur/end of the running or last pull on ``path`` (or of the job given)."""
    info = _job(path).info()
    return BlockPullInfo(info.cur, info.end)


def block_pull_abort(path: Any) -> int:
    """Abort the pull on ``path`` and wait until it has stopped and the image is closed
    (so the caller may open it at once); returns 0."""
    if _is_job(path):
        path.abort(wait=True)
        return 0
    _img, job, closed = _entry(path)
    job.abort(wait=True)
    if not job.in_job_thread():   # not from an event callback
        closed.wait()
    return 0


def block_job_set_speed(path: Any, bandwidth: int, flags: int = 0) -> int:
    """Change the pull's limit: MiB/s, or bytes/s with BLOCK_JOB_SPEED_BANDWIDTH_BYTES.
    Raises ValueError for a negative or fractional bandwidth."""
    bw = _bytes_per_second(bandwidth, bool(flags & BLOCK_JOB_SPEED_BANDWIDTH_BYTES))
    _job(path).set_speed(bw)
    return 0


def event_register(event_id: int, callback: Callable[[str, int], None]) -> int:
    """Call ``callback(path, status)`` when any pull ends; returns an id to deregister."""
    if event_id != EVENT_ID_BLOCK_PULL:
        raise ValueError(f"unknown event id {event_id}")
    with _lock:
        eid = next(_ids)
        _callbacks[eid] = callback
    return eid


def event_deregister(eid: int) -> int:
    """Stop calling the callback registered as ``eid``; returns 0."""
    with _lock:
        if _callbacks.pop(eid, None) is None:
            raise ValueError(f"no event callback with id {eid}")
    return 0
