"""``blockpull pull A B C ...``: several images pulled at once under one bandwidth.

``--jobs N`` pulls at most N images at a time (default: all of them); ``--bandwidth`` is
then the total for all of them (a ``blockpull.Budget``), shared fairly among the running
pulls, each ending pull giving its share to the others. Progress is one line per image as it
ends (or JSON lines: each image's events, tagged with its path). Ctrl-C or SIGTERM aborts
every running pull cleanly (each image stays valid and backed) and starts no more.
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

from blockpull.budget import Budget
from blockpull.cli.common import EXIT_FAILED, EXIT_OK, PROG, MiB, UsageError, log, open_image
from blockpull.cli.output import emit_json
from blockpull.image import Image
from blockpull.job import PullEvent, PullJob
from blockpull.units import format_size

__all__ = ["cmd_pull_many"]


class _Stop(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _check_args(args: argparse.Namespace) -> None:
    if args.control:
        raise UsageError("--control steers one pull: give one PATH with it")
    if args.base:
        raise UsageError("--base names an image of one chain: give one PATH with it")
    if len(set(os.path.realpath(p) for p in args.paths)) != len(args.paths):
        raise UsageError("the same image is named twice: name each image once")
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs takes a whole number of 1 or more")


def _report(path: str, img: Image, job: PullJob, json_lines: bool) -> bool:
    """Print how the pull of ``path`` ended; True if it completed."""
    info = job.info()
    backing = img.backing_name
    if json_lines:
        emit_json({"type": "event", "event": str(job.status), "path": path,
                   **{k: v for k, v in info._asdict().items() if k != "status"},
                   "backing": backing,
                   "error": None if job.error is None else str(job.error)}, sys.stdout)
    if job.status == "completed":
        if not json_lines:
            rate = info.copied_bytes / info.elapsed / MiB if info.elapsed > 0 else 0.0
            print(f"pulled {path}: {format_size(info.copied_bytes)} copied in "
                  f"{info.elapsed:.1f} s ({rate:.1f} MiB/s); "
                  + (f"now backed by {backing}" if backing else "no backing file now"))
        return True
    if job.status == "cancelled":
        print(f"{PROG}: pull of {path} aborted at {format_size(info.cur)} of "
              f"{format_size(info.end)}: the image is valid and still backed; run the same "
              f"command again to resume", file=sys.stderr)
    else:
        print(f"{PROG}: error: {job.error or f'{path}: pull {job.status}'}", file=sys.stderr)
    return False


def _start(args: argparse.Namespace, path: str, budget: Budget,
           events: "queue.SimpleQueue[Tuple[str, PullEvent]]") -> Tuple[Image, PullJob]:
    one = argparse.Namespace(**vars(args))
    one.path = path
    img = open_image(one, readonly=False)
    def on_event(ev: PullEvent) -> None:
        events.put((path, ev))
    try:
        job = img.pull(on_error=args.on_error, budget=budget, on_event=on_event)
    except BaseException:
        img.close()
        raise
    return img, job


def cmd_pull_many(args: argparse.Namespace) -> int:
    """Pull every PATH, at most ``--jobs`` at a time, ``--bandwidth`` shared by all."""
    _check_args(args)
    json_lines = args.output == "json"
    budget = Budget(args.bandwidth)
    todo = list(args.paths)
    width = args.jobs or len(todo)
    running: Dict[str, Tuple[Image, PullJob]] = {}
    events: "queue.SimpleQueue[Tuple[str, PullEvent]]" = queue.SimpleQueue()
    ok = True
    signum: Optional[int] = None

    resume_asked: List[bool] = []

    def stop(s: int, _frame: Any) -> None:
        raise _Stop(s)

    def resume(_s: int, _frame: Any) -> None:
        resume_asked.append(True)
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, resume)
    try:
        try:
            while todo or running:
                while todo and len(running) < width:
                    path = todo.pop(0)
                    try:
                        running[path] = _start(args, path, budget, events)
                    except Exception as exc:  # this image cannot start: the others go on
                        print(f"{PROG}: error: {exc}", file=sys.stderr)
                        ok = False
                _drain(events, json_lines)
                if resume_asked:  # SIGUSR1: retry every pull paused by an error (stop)
                    resume_asked.clear()
                    for _img, job in running.values():
                        job.resume()
                for path, (img, job) in list(running.items()):
                    if job.done():
                        ok = _report(path, img, job, json_lines) and ok
                        img.close()
                        del running[path]
                time.sleep(0.05)
        except _Stop as exc:
            signum = exc.signum
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            log.info("aborting %d running pulls (signal %d)", len(running), signum)
            for _img, job in running.values():
                job.abort(wait=False)
            for path, (img, job) in running.items():
                job.wait()
                _report(path, img, job, json_lines)
                img.close()
            running.clear()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for img, job in running.values():  # an error above: leave nothing running
            job.abort(wait=True)
            img.close()
    _drain(events, json_lines)
    if signum is not None:
        if todo:
            print(f"{PROG}: not started: {' '.join(todo)}", file=sys.stderr)
        return 128 + signum
    return EXIT_OK if ok else EXIT_FAILED


def _drain(events: "queue.SimpleQueue[Tuple[str, PullEvent]]", json_lines: bool) -> None:
    """Show the events of the running pulls (errors, pauses) as they come."""
    while True:
        try:
            path, ev = events.get_nowait()
        except queue.Empty:
            return
        if ev.kind in ("completed", "failed", "cancelled"):
            continue
        if json_lines:
            emit_json({"type": "event", "event": ev.kind, "path": path,
                       "cur": ev.info.cur, "end": ev.info.end,
                       "error": None if ev.error is None else str(ev.error)}, sys.stdout)
        elif ev.kind == "error" and ev.error is not None:
            print(f"{PROG}: I/O error in {path}: {ev.error}", file=sys.stderr)
