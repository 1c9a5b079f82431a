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
from typing import Any, Dict, List, Optional, Set, Tuple

from blockpull.budget import Budget
from blockpull.cli.common import (EXIT_FAILED, EXIT_OK, PROG, MiB, UsageError, describe, log,
                                  open_image)
from blockpull.cli.output import emit_json
from blockpull.errors import ImageLockedError
from blockpull.image import Image
from blockpull.job import PullEvent, PullJob
from blockpull.units import format_size

__all__ = ["cmd_pull_many"]


def _identity(path: str) -> Any:
    """What names one file: its device and inode (a hard link, a symlink and a path
    through ``..`` are the same image), or the resolved path of a file not there."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def _chain_ids(img: Image) -> Set[Any]:
    """What names each file of ``img``'s chain (as ``_identity`` does)."""
    return {layer.file.identity() for layer in img.layers}


def _check_args(args: argparse.Namespace) -> None:
    if args.control:
        raise UsageError("--control steers one pull: give one PATH with it")
    if args.base:
        raise UsageError("--base names an image of one chain: give one PATH with it")
    if len(set(_identity(p) for p in args.paths)) != len(args.paths):
        raise UsageError("the same image is named twice: name each image once")


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
        job = img.pull(on_error=args.on_error, budget=budget, on_event=on_event,
                       compressed="keep" if args.keep_compressed else "inflate")
    except BaseException:
        img.close()
        raise
    return img, job


def cmd_pull_many(args: argparse.Namespace) -> int:
    """Pull every PATH, at most ``--jobs`` at a time, ``--bandwidth`` shared by all.

    SIGINT and SIGTERM are noted, not raised: what the loop is doing (opening an image,
    closing one whose pull ended) finishes, then every running pull is aborted."""
    _check_args(args)
    stop_asked: List[int] = []
    resume_asked: List[bool] = []

    def stop(s: int, _frame: Any) -> None:
        stop_asked.append(s)

    def resume(_s: int, _frame: Any) -> None:
        resume_asked.append(True)
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, resume)
    runner = _Runner(args)
    try:
        runner.run(stop_asked, resume_asked)
        if stop_asked:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            runner.abort_all(stop_asked[0])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        runner.leave_nothing_running()
    _drain(runner.events, runner.json_lines)
    if stop_asked:
        if runner.todo:
            print(f"{PROG}: not started: {' '.join(runner.todo)}", file=sys.stderr)
        return 128 + stop_asked[0]
    return EXIT_OK if runner.ok else EXIT_FAILED


class _Runner:
    """The images to pull, the pulls running (at most ``--jobs``) and how they went."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json_lines = args.output == "json"
        self.budget = Budget(args.bandwidth)
        self.todo = list(args.paths)
        self.width = args.jobs or len(self.todo)
        self.running: Dict[str, Tuple[Image, PullJob]] = {}
        self.events: "queue.SimpleQueue[Tuple[str, PullEvent]]" = queue.SimpleQueue()
        self.ok = True

    def run(self, stop_asked: List[int], resume_asked: List[bool]) -> None:
        """Start, watch and report the pulls until all ended or a signal asked to stop."""
        while (self.todo or self.running) and not stop_asked:
            while self.todo and len(self.running) < self.width and not stop_asked:
                path = self.todo.pop(0)
                try:
                    self.running[path] = _start(self.args, path, self.budget, self.events)
                except Exception as exc:  # this image cannot start: the others go on
                    other = self._sharing_chain(path) \
                        if isinstance(exc, ImageLockedError) else None
                    self._not_started(path, describe(exc)[1] if other is None else
                                      f"{path}: one of it and {other} backs the other, "
                                      f"and {other} is being pulled: pull them one at a "
                                      f"time (--jobs 1)")
            _drain(self.events, self.json_lines)
            if resume_asked:  # SIGUSR1: retry every pull paused by an error (stop)
                resume_asked.clear()
                for _img, job in self.running.values():
                    job.resume()
            for path, (img, job) in list(self.running.items()):
                if job.done():
                    self.ok = _report(path, img, job, self.json_lines) and self.ok
                    img.close()
                    del self.running[path]
            time.sleep(0.05)

    def _sharing_chain(self, path: str) -> Optional[str]:
        """The running image whose chain holds ``path``, or that is in ``path``'s chain
        (our own lock then refused ``path``), or None. (Images that merely share a base,
        such as overlays of one template, do not count: that sharing is allowed.)"""
        top = _identity(path)
        mine = {top}
        try:
            probe = open_image(argparse.Namespace(**{**vars(self.args), "path": path,
                                                     "force_share": True}), readonly=True)
        except Exception:
            pass
        else:
            try:
                mine = _chain_ids(probe)
            finally:
                probe.close()
        for other, (img, _job) in self.running.items():
            if top in _chain_ids(img) or img.layers[0].file.identity() in mine:
                return other
        return None

    def _not_started(self, path: str, message: str) -> None:
        """Tell that ``path`` could not start (in JSON too: every image gets an end)."""
        if self.json_lines:
            emit_json({"type": "event", "event": "failed", "path": path, "cur": 0, "end": 0,
                       "error": message}, sys.stdout)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        self.ok = False

    def abort_all(self, signum: int) -> None:
        """Abort every running pull, then report and close each."""
        log.info("aborting %d running pulls (signal %d)", len(self.running), signum)
        for _img, job in self.running.values():
            job.abort(wait=False)
        for path, (img, job) in self.running.items():
            job.wait()
            _report(path, img, job, self.json_lines)
            img.close()
        self.running.clear()

    def leave_nothing_running(self) -> None:
        """After an unexpected error: abort and close what still runs."""
        for img, job in self.running.values():
            job.abort(wait=True)
            img.close()
        self.running.clear()


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
            if ev.job.on_error == "stop":
                print(f"{PROG}: pull of {path} paused; send SIGUSR1 (kill -USR1 "
                      f"{os.getpid()}) to retry every paused pull, Ctrl-C to abort them all",
                      file=sys.stderr)
