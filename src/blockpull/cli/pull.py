"""``blockpull pull``: pull the chain into PATH with progress; Ctrl-C aborts cleanly.

``run_pull`` is the loop that shows a pull until it ends, shared with ``demo``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import queue
import signal
import sys
from typing import Any, Callable, Iterator, List, Optional, Tuple

from blockpull.cli.common import (EXIT_FAILED, EXIT_OK, PROG, MiB, OperationFailed,
                                  add_opener, add_output, add_progress, bandwidth_arg, count_arg,
                                  log, open_image, want_bar)
from blockpull.cli.output import Progress
from blockpull.image import Image
from blockpull.job import PullEvent, PullJob
from blockpull.units import format_size

__all__ = ["add_parser", "cmd_pull", "run_pull"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``pull`` to the subcommands ``sub``."""
    p = sub.add_parser("pull", parents=[common], help="pull the backing chain into the image",
                       description="Copy what the image inherits from its backing chain into "
                                   "it, then drop the backing link (or keep --base). Ctrl-C "
                                   "aborts cleanly; running the command again resumes.")
    p.add_argument("--base", metavar="B",
                   help="keep this image of the chain as the new backing file (any path "
                        "to it, or the name the chain records for it)")
    p.add_argument("--bandwidth", type=bandwidth_arg, default=0, metavar="RATE",
                   help="limit in bytes/s, e.g. 50M (MiB/s); 0 = unlimited (default); with "
                        "several images, the total for all of them")
    p.add_argument("--jobs", type=count_arg, default=None, metavar="N",
                   help="with several images: pull at most N at a time (default: all)")
    p.add_argument("--on-error", choices=("report", "stop", "ignore"), default="report",
                   help="on an I/O error: fail (report, default); pause until SIGUSR1 "
                        "then retry (stop); skip the chunk and finish as failed (ignore)")
    p.add_argument("--keep-compressed", action="store_true",
                   help="copy compressed clusters of a qcow2 backing into a qcow2 top as "
                        "compressed clusters (same cluster size), not inflated; the result "
                        "says when they had to be inflated and why")
    p.add_argument("--control", metavar="QMP_SOCKET",
                   help="listen on this Unix socket (0600) for QMP: the pull is the block "
                        "job 'top' (query-block-jobs, block-job-set-speed/pause/resume/"
                        "cancel); quit aborts it")
    add_opener(p, False)
    add_progress(p)
    add_output(p)
    p.add_argument("paths", metavar="PATH", nargs="+",
                   help="the image; several images are pulled at once under one --bandwidth")
    p.set_defaults(func=cmd_pull)


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while a pull was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _abort_signals(on_resume: Callable[[], None]) -> Iterator[None]:
    """While a pull runs: SIGINT and SIGTERM raise _Interrupted in the main thread (so
    the pull can be aborted cleanly); SIGUSR1 calls ``on_resume``."""
    def interrupt(signum: int, _frame: Any) -> None:
        raise _Interrupted(signum)

    def resume(_signum: int, _frame: Any) -> None:
        on_resume()

    handlers = {signal.SIGINT: interrupt, signal.SIGTERM: interrupt, signal.SIGUSR1: resume}
    old = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _abort(img: Image, job: PullJob, signum: int) -> None:
    """Abort ``job`` and wait for it; a second Ctrl-C must not leave the abort half done,
    so SIGINT and SIGTERM are ignored meanwhile."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("aborting the pull of %s (signal %d)", img.path, signum)
        job.abort(wait=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_pull(img: Image, progress: Progress, base: Optional[str] = None, bandwidth: int = 0,
             on_error: str = "report", start: Any = None) -> Tuple[PullJob, Optional[int]]:
    """Pull ``img`` showing ``progress`` until the job ends; ``start`` starts the pull
    instead of ``img.pull`` (same arguments), e.g. a QMP control socket's. ``bandwidth``
    is in bytes/s (0: unlimited).

    Returns the ended job and the number of the signal that aborted it, if SIGINT or
    SIGTERM did: the job is then aborted cleanly (the image stays valid and backed).
    """
    events: "queue.SimpleQueue[PullEvent]" = queue.SimpleQueue()
    resume_asked: List[bool] = []
    job = (start or img.pull)(base=base, bandwidth=bandwidth, on_error=on_error,
                              on_event=events.put)
    signum: Optional[int] = None
    try:
        with _abort_signals(lambda: resume_asked.append(True)):
            progress.start(job.info())
            while not job.wait(progress.interval):
                progress.drain(events)
                if resume_asked:
                    resume_asked.clear()
                    log.info("resuming the pull of %s", img.path)
                    job.resume()
                progress.update(job.info())
    except _Interrupted as exc:
        signum = exc.signum
    except KeyboardInterrupt:
        signum = signal.SIGINT
    if signum is not None:
        _abort(img, job, signum)
    progress.drain(events)
    return job, signum


def _close_quietly(img: Image) -> None:
    """Close ``img`` when another error is already on its way: a failure to close is
    logged, not raised over it."""
    try:
        img.close()
    except Exception as exc:
        log.warning("closing %s after the failed pull: %s", img.path, exc)


def _pull_steered(args: argparse.Namespace, img: Image,
                  progress: Progress) -> Tuple[PullJob, Optional[int]]:
    """``run_pull`` with ``--control``'s QMP socket open meanwhile, if given: the pull is
    its job "top" and QMP ``quit`` aborts it."""
    control = None
    pull_fn: Any = (functools.partial(img.pull, compressed="keep")
                    if getattr(args, "keep_compressed", False) else img.pull)
    if args.control:
        from blockpull.qmp import ControlServer

        def _quit() -> None:
            if img.job is not None:
                img.job.abort(wait=False)
        control = ControlServer(args.control, img, pull_fn, on_quit=_quit)
    try:
        return run_pull(img, progress, base=args.base, bandwidth=args.bandwidth,
                        on_error=args.on_error, start=control.start if control else pull_fn)
    finally:
        if control is not None:
            control.close()


def cmd_pull(args: argparse.Namespace) -> int:
    """``blockpull pull``: pull the chain into PATH with progress, Ctrl-C aborts cleanly."""
    if len(args.paths) > 1:
        from blockpull.cli.pull_many import cmd_pull_many
        return cmd_pull_many(args)
    args.path = args.paths[0]
    json_lines = args.output == "json"
    show_bar = want_bar(args, json_lines)
    img = open_image(args, readonly=False)
    try:
        progress = Progress(show_bar, json_lines, os.path.basename(img.path))
        job, signum = _pull_steered(args, img, progress)
        info = job.info()
        backing = img.backing_name
        progress.finish(info, job.status, job.error, backing)
    except BaseException:
        _close_quietly(img)
        raise
    if job.status == "failed":
        # the pull's own error is the one to show, with its advice: closing an image
        # the disk just refused (a full disk, a dead device) fails for the same reason
        _close_quietly(img)
    else:
        img.close()
    if job.status == "cancelled":
        held = f"still backed by {backing}" if backing else "still backed"
        print(f"{PROG}: pull of {args.path} aborted at {format_size(info.cur)} of "
              f"{format_size(info.end)}: the image is valid and {held}; run the same command "
              f"again to resume", file=sys.stderr)
        return 128 + (signum or signal.SIGINT) if signum else EXIT_FAILED
    if job.status != "completed":
        raise OperationFailed(str(job.error or f"{args.path}: pull {job.status}"))
    if not json_lines:
        rate = info.copied_bytes / info.elapsed / MiB if info.elapsed > 0 else 0.0
        now = f"now backed by {backing}" if backing else "no backing file now"
        print(f"pulled {args.path}: {format_size(info.copied_bytes)} copied"
              + (f", {format_size(info.zeroed_bytes)} as zero clusters" if info.zeroed_bytes else "")
              + (f", {format_size(info.kept_bytes)} of it kept compressed"
                 if info.kept_bytes else "")
              + f" in {info.elapsed:.1f} s ({rate:.1f} MiB/s); {now}")
        if args.keep_compressed and info.compressed != "keep":
            print(f"{PROG}: note: {info.compressed_reason}", file=sys.stderr)
    return EXIT_OK
