"""The ``blockpull`` command line: create, info, map, pull, check, demo and serve.

Every command that reports takes ``--output human|json``. Exit codes: 0 success, 1 the
operation failed, 2 bad usage or bad input, 130 interrupted (Ctrl-C); ``check`` follows
``qemu-img check`` (0 clean, 2 corrupt, 3 leaks only). An error is one line on stderr,
``blockpull: error: ...``; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
import traceback
from typing import (Any, Callable, Dict, Iterator, List, NamedTuple, NoReturn, Optional,
                    Sequence, TextIO, Tuple)

from tqdm import tqdm  # type: ignore[import-untyped]

import blockpull
from blockpull.errors import BackingChainError, BlockpullError, ImageLockedError
from blockpull.image import Extent, Image, _kernel_abspath
from blockpull.job import PullEvent, PullInfo, PullJob
from blockpull.units import format_size, parse_bandwidth, parse_size

__all__ = ["main", "build_parser", "UsageError", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE",
           "EXIT_INTERRUPTED"]

log = logging.getLogger("blockpull")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MiB = 1 << 20
PROG = "blockpull"

#: the kinds of PullEvent that end a job
_TERMINAL = ("completed", "failed", "cancelled")


class UsageError(Exception):
    """Bad usage or bad input found by the command line itself: exit code 2."""


class OperationFailed(Exception):
    """The command ran and its operation failed (the message says why): exit code 1."""


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while a pull was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``blockpull: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bandwidth_arg(text: str) -> int:
    try:
        return parse_bandwidth(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_create_options(items: Sequence[str]) -> Dict[str, Any]:
    """``-o cluster_size=64K,compat=1.1`` (repeatable) as create() keyword arguments."""
    out: Dict[str, Any] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not value.strip():
                raise UsageError(f"-o {part!r}: expected NAME=VALUE (cluster_size=64K,compat=1.1)")
            value = value.strip()
            if key == "cluster_size":
                try:
                    out["cluster_size"] = parse_size(value)
                except ValueError as exc:
                    raise UsageError(f"-o cluster_size: {exc}") from None
            elif key == "compat":
                if value in ("v3", "1.1"):
                    value = "1.1"
                elif value in ("v2", "0.10"):
                    value = "0.10"
                else:
                    raise UsageError(f"-o compat={value}: use 1.1 (qcow2 v3) or 0.10 (qcow2 v2)")
                out["compat"] = value
            else:
                raise UsageError(f"-o {key}: unknown option (known: cluster_size, compat)")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``blockpull`` command and its subcommands."""
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log what blockpull does on stderr (-vv: debug detail)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show a traceback with errors")

    def output(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", choices=("human", "json"), default="human",
                       help="human-readable text (default) or JSON")

    def progress(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--progress", dest="progress", action="store_true", default=None,
                       help="draw the progress bar on stderr even when it is not a terminal")
        g.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar")

    parser = _Parser(
        prog=PROG,
        description="Pull a copy-on-write disk image (qcow2, QED) free of its backing chain "
                    "while it stays in use.",
        epilog="Exit codes: 0 success, 1 the operation failed, 2 bad usage or input, "
               "130 interrupted. Sizes take K, M, G, T suffixes (1024-based).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {blockpull.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what blockpull does on stderr (-vv: debug detail)")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show a traceback with errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("create", parents=[common], help="create an empty image or an overlay",
                       description="Create a qcow2 or QED image, empty or backed by another.")
    p.add_argument("-f", "--format", dest="fmt", default="qcow2", metavar="FMT",
                   help="qcow2 (default) or qed")
    p.add_argument("-b", "--backing", metavar="BACKING",
                   help="backing file, recorded as given (relative names resolve against "
                        "the new image's directory)")
    p.add_argument("-F", "--backing-format", metavar="FMT",
                   help="format of the backing file (qcow2, qed or raw); probed and "
                        "recorded when omitted, except raw, which must be named")
    p.add_argument("-o", "--options", action="append", default=[], metavar="OPTS",
                   help="cluster_size=N (512 to 2M), compat=1.1|0.10 (qcow2 v3 or v2)")
    output(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("size", metavar="SIZE", nargs="?", type=_size_arg,
                   help="virtual size, e.g. 10G (defaults to the backing file's)")
    p.set_defaults(func=cmd_create)

    def opener(p: argparse.ArgumentParser, force_share: bool) -> None:
        p.add_argument("-f", "--format", dest="fmt", metavar="FMT",
                       help="format of PATH (probed if omitted; raw must be named)")
        p.add_argument("-F", "--backing-format", metavar="FMT",
                       help="format of backing files that do not record one (under QED, "
                            "a qcow2 or QED backing is found by its magic)")
        if force_share:
            p.add_argument("-U", "--force-share", action="store_true",
                           help="read an image another process (a VM) has open for writing; "
                                "what you see may be changing")

    p = sub.add_parser("info", parents=[common], help="show the chain and what is allocated",
                       description="Show the backing chain (formats, sizes) and a summary "
                                   "of what is allocated where.")
    opener(p, True)
    output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("map", parents=[common], help="show the allocation map",
                       description="Show the allocation map; --output json prints what "
                                   "`qemu-img map --output=json` prints.")
    opener(p, True)
    output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("pull", parents=[common], help="pull the backing chain into the image",
                       description="Copy what the image inherits from its backing chain into "
                                   "it, then drop the backing link (or keep --base). Ctrl-C "
                                   "aborts cleanly; running the command again resumes.")
    p.add_argument("--base", metavar="B",
                   help="keep this image of the chain as the new backing file (any path "
                        "to it, or the name the chain records for it)")
    p.add_argument("--bandwidth", type=_bandwidth_arg, default=0, metavar="RATE",
                   help="limit in bytes/s, e.g. 50M (MiB/s); 0 = unlimited (default)")
    p.add_argument("--on-error", choices=("report", "stop", "ignore"), default="report",
                   help="on an I/O error: fail (report, default); pause until SIGUSR1 "
                        "then retry (stop); skip the chunk and finish as failed (ignore)")
    p.add_argument("--control", metavar="QMP_SOCKET",
                   help="listen on this Unix socket (0600) for QMP: the pull is the block "
                        "job 'top' (query-block-jobs, block-job-set-speed/pause/resume/"
                        "cancel); quit aborts it")
    opener(p, False)
    progress(p)
    output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("check", parents=[common], help="check an image's metadata",
                       description="Check the image's metadata for consistency, as "
                                   "`qemu-img check` does. Exit codes: 0 clean, 1 check "
                                   "incomplete, 2 corrupt, 3 leaks only.")
    p.add_argument("-f", "--format", dest="fmt", metavar="FMT", help="format (probed if omitted)")
    p.add_argument("-r", "--repair", choices=("leaks",),
                   help="repair leaked clusters (corruptions are only reported)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="check an image another process (a VM) has open for writing; "
                        "what it finds may be changing (not with -r)")
    output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("demo", parents=[common], help="build a sample chain and pull it",
                       description="Build a qcow2 template with data and an overlay with "
                                   "writes of its own, pull the overlay under a bandwidth "
                                   "limit, and verify it reads the same as the chain did.")
    p.add_argument("directory", metavar="DIR", nargs="?",
                   help="where to build the images (kept); default: a temporary directory, "
                        "removed afterwards unless --keep")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--size", type=_size_arg, default=DEMO_DATA, metavar="SIZE",
                   help=f"data in the template (default {format_size(DEMO_DATA)})")
    p.add_argument("--bandwidth", type=_bandwidth_arg, default=DEMO_BANDWIDTH, metavar="RATE",
                   help=f"pull speed limit (default {DEMO_BANDWIDTH >> 20}M; 0 = unlimited)")
    progress(p)
    output(p)
    p.set_defaults(func=cmd_demo)

    from blockpull.serve_cli import add_parser as add_serve
    add_serve(sub, common, output, progress, _bandwidth_arg)
    return parser


# ---- opening images ---------------------------------------------------------------------


_FORCE_SHARE_HINT = "; to look at it anyway (what you see may be changing), add -U"


@contextlib.contextmanager
def _suggest_force_share() -> Iterator[None]:
    """A read-only command refused by a lock says that -U reads the image anyway."""
    try:
        yield
    except ImageLockedError as exc:
        raise ImageLockedError(f"{exc}{_FORCE_SHARE_HINT}") from exc


def _open(args: argparse.Namespace, readonly: bool) -> Image:
    """Open PATH with the format options every command shares."""
    force = getattr(args, "force_share", False)
    opening = _suggest_force_share() if readonly else contextlib.nullcontext()
    with opening:
        return Image(args.path, readonly=readonly, format=getattr(args, "fmt", None),
                     backing_format=getattr(args, "backing_format", None),
                     _lock_files=not force)


def _emit_json(obj: Any, out: TextIO) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


# ---- create -----------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    """``blockpull create``: a new empty image or overlay."""
    if args.backing_format and not args.backing:
        raise UsageError("-F/--backing-format needs -b/--backing")
    opts = _parse_create_options(args.options)
    size = args.size
    if size is None:
        if not args.backing:
            raise UsageError("SIZE is required without a backing file (e.g. 10G)")
        size = 0
    elif size == 0:
        raise UsageError("SIZE must be positive (omit it to take the backing file's size)")
    blockpull.create(args.path, size, fmt=args.fmt, backing=args.backing,
                     backing_format=args.backing_format, **opts)
    # report what the new header says, reading it alone (the backing file may be in use)
    from blockpull.formats import open_driver as _open_driver
    drv = _open_driver(args.path, args.fmt, False, "top")
    try:
        report: Dict[str, Any] = {
            "path": _kernel_abspath(args.path), "format": drv.format,
            "virtual_size": drv.size, "cluster_size": drv.cluster_size,
            "backing": drv.backing_name, "backing_format": drv.backing_format}
    finally:
        drv.close()
    if args.output == "json":
        _emit_json(report, sys.stdout)
    else:
        line = (f"created {args.path}: {report['format']}, {format_size(report['virtual_size'])} "
                f"({report['virtual_size']} bytes), cluster size {format_size(report['cluster_size'])}")
        if report["backing"] and report["backing_format"]:
            line += f", backed by {report['backing']} ({report['backing_format']})"
        elif report["backing"]:
            line += (f", backed by {report['backing']} ({report['format']} records no format "
                     f"for it: its qcow2 or QED header tells it when the image is opened)")
        print(line)
    return EXIT_OK


# ---- info -------------------------------------------------------------------------------


class Allocation(NamedTuple):
    """How the virtual disk is provided, in bytes: data by chain depth, zero clusters,
    and unallocated ranges (which read as zeros)."""
    data_by_depth: List[int]
    zero: int
    unallocated: int

    @property
    def data_in_top(self) -> int:
        """Data the top image holds itself."""
        return self.data_by_depth[0]

    @property
    def data_in_backing(self) -> int:
        """Data read from the backing chain: what a whole pull copies."""
        return sum(self.data_by_depth[1:])


def allocation(extents: Sequence[Extent], depth: int) -> Allocation:
    """Summarise a map of a chain ``depth`` images deep."""
    data = [0] * depth
    zero = unalloc = 0
    for e in extents:
        if e.data:
            data[e.depth] += e.length
        elif e.present:
            zero += e.length
        else:
            unalloc += e.length
    return Allocation(data, zero, unalloc)


def _disk_usage(path: str) -> int:
    """Bytes the image takes on its storage: the blocks allocated to a file, the whole
    size of a block device (whose st_blocks is 0; it takes all of itself)."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        return st.st_blocks * 512
    except OSError:
        return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``blockpull info``: the chain with formats and sizes, and an allocation summary."""
    with _open(args, readonly=True) as img:
        chain = img.chain
        alloc = allocation(img.map(), len(chain))
        report: Dict[str, Any] = {
            "path": img.path, "format": img.format, "virtual_size": img.size,
            "cluster_size": img.cluster_size, "backing": img.backing_name,
            "chain": [{"path": c.path, "format": c.format, "virtual_size": c.size,
                       "disk_size": _disk_usage(c.path), "data_bytes": alloc.data_by_depth[i]}
                      for i, c in enumerate(chain)],
            "allocation": {"data_in_top": alloc.data_in_top,
                           "data_in_backing": alloc.data_in_backing,
                           "zero": alloc.zero, "unallocated": alloc.unallocated},
        }
    if args.output == "json":
        _emit_json(report, sys.stdout)
        return EXIT_OK
    size = report["virtual_size"]
    lines = [f"image:        {report['path']}",
             f"format:       {report['format']}, cluster size {format_size(report['cluster_size'])}",
             f"virtual size: {format_size(size)} ({size} bytes)",
             "backing:      " + (report["backing"] or "none"),
             "chain, top first:"]
    rows = [("", "path", "format", "virtual size", "on disk", "data read from it")]
    for i, c in enumerate(report["chain"]):
        rows.append((f"[{i}]", c["path"], c["format"], format_size(c["virtual_size"]),
                     format_size(c["disk_size"]), format_size(c["data_bytes"])))
    lines += _table(rows, indent=2)

    def pct(n: int) -> str:
        return f"{100.0 * n / size:5.1f}%" if size else "  0.0%"
    a = report["allocation"]
    lines.append("allocation of the virtual disk:")
    for label, n in (("data in the top image", a["data_in_top"]),
                     ("data from the backing chain", a["data_in_backing"]),
                     ("zero clusters", a["zero"]),
                     ("unallocated (reads as zeros)", a["unallocated"])):
        lines.append(f"  {label:<29} {format_size(n):>10}  {pct(n)}")
    if len(report["chain"]) > 1:
        lines.append(f"a pull copies about {format_size(a['data_in_backing'])} into the top image")
    print("\n".join(lines))
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]], indent: int = 0) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(" " * indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip()
            for r in rows]


# ---- map --------------------------------------------------------------------------------


def format_map_json(extents: Sequence[Extent]) -> str:
    """The text `qemu-img map --output=json` prints for these extents (one per line)."""
    items = []
    for e in extents:
        fields = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in e.to_json().items())
        items.append("{ " + fields + "}")
    return "[" + ",\n".join(items) + "]"


def cmd_map(args: argparse.Namespace) -> int:
    """``blockpull map``: the allocation map, in qemu-img map's shapes."""
    with _open(args, readonly=True) as img:
        extents = img.map()
        paths = [c.path for c in img.chain]
    if args.output == "json":
        print(format_map_json(extents))
        return EXIT_OK
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in extents:
        if e.data and e.offset is not None:
            print(f"{e.start:<#16x}{e.length:<#16x}{e.offset:<#16x}{paths[e.depth]}"
                  .replace("0x0 ", "0   "))
    return EXIT_OK


# ---- pull -------------------------------------------------------------------------------


def _terminal_size(stream: Any) -> os.terminal_size:
    """Size of the terminal ``stream`` writes to; 80x24 where it does not say (a pty
    that reports 0x0 would otherwise make tqdm hide the bar)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    fallback = shutil.get_terminal_size()
    return os.terminal_size((size.columns if size.columns > 0 else fallback.columns,
                             size.lines if size.lines > 0 else fallback.lines))


class _PullBar(tqdm):
    """tqdm's bar with blockpull's units: bytes as KiB/MiB/GiB and the rate in MiB/s."""

    @property
    def format_dict(self) -> Dict[str, Any]:  # type: ignore[override]
        d = super().format_dict
        d["ncols"] = _terminal_size(self.fp).columns     # follows resizes
        rate = d.get("rate")
        if not rate and d.get("n") and d.get("elapsed"):
            rate = d["n"] / d["elapsed"]      # tqdm's smoothed rate is gone once it closes
        d["done"] = format_size(d.get("n") or 0)
        d["whole"] = format_size(d.get("total") or 0)
        d["speed"] = "--.- MiB/s" if not rate else f"{rate / MiB:.1f} MiB/s"
        return d


_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {done}/{whole} {speed} ETA {remaining}"


def _info_json(info: PullInfo) -> Dict[str, Any]:
    d = info._asdict()
    d["elapsed"] = round(d["elapsed"], 3)
    return d


def _error_json(err: Optional[BaseException]) -> Optional[Dict[str, Any]]:
    if err is None:
        return None
    return {"message": str(err), "errno": getattr(err, "errno", None),
            "operation": getattr(err, "operation", None), "offset": getattr(err, "offset", None)}


class Progress:
    """Shows a running pull: a tqdm bar on stderr (``bar``), JSON lines on stdout
    (``json``: progress lines, events, and the final event last), or nothing."""

    def __init__(self, bar: bool, json_lines: bool, name: str,
                 out: Optional[TextIO] = None, err: Optional[TextIO] = None,
                 json_interval: float = 0.5) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.json_lines = json_lines
        self.json_interval = json_interval
        self.name = name
        self.show_bar = bar
        self._bar: Optional[_PullBar] = None
        self._last_json = 0.0
        self._seen = 0

    #: seconds between polls of the job
    interval = 0.1

    def start(self, info: PullInfo) -> None:
        """The job has started: draw the empty bar or the first progress line."""
        if self.show_bar:
            self._bar = _PullBar(total=info.end, desc=self.name, file=self.err,
                                 bar_format=_BAR_FORMAT, leave=True,
                                 nrows=_terminal_size(self.err).lines,
                                 mininterval=0.1, smoothing=0.2)
        self.update(info, force=True)

    def update(self, info: PullInfo, force: bool = False) -> None:
        """Show the progress in ``info``."""
        if self._bar is not None:
            if info.end != self._bar.total:
                self._bar.total = info.end
            delta = info.cur - self._seen
            if delta > 0:
                self._bar.update(delta)
            elif force:
                self._bar.refresh()
            self._bar.set_postfix_str("paused" if info.status == "paused" else "", refresh=False)
        self._seen = info.cur
        now = time.monotonic()
        if self.json_lines and (force or now - self._last_json >= self.json_interval):
            self._last_json = now
            _emit_json({"type": "progress", **_info_json(info)}, self.out)

    def event(self, ev: PullEvent) -> None:
        """Show an event of a running job (paused, resumed, error)."""
        if self.json_lines:
            _emit_json({"type": "event", "event": ev.kind, **_info_json(ev.info),
                        "error": _error_json(ev.error)}, self.out)
        if ev.kind == "error" and ev.error is not None:
            self.message(f"{PROG}: I/O error: {ev.error}")
            if ev.job.on_error == "stop":
                self.message(f"{PROG}: pull paused; send SIGUSR1 (kill -USR1 {os.getpid()}) "
                             f"to retry, Ctrl-C to abort")

    def message(self, text: str) -> None:
        """A line on stderr that does not tear the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.err)
        else:
            print(text, file=self.err, flush=True)

    def finish(self, info: PullInfo, kind: str, error: Optional[BaseException],
               backing: Optional[str]) -> None:
        """The job has ended: close the bar and print the final event line."""
        self.update(info, force=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.json_lines:
            _emit_json({"type": "event", "event": kind, **_info_json(info),
                        "backing": backing, "error": _error_json(error)}, self.out)


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


def run_pull(img: Image, progress: Progress, base: Optional[str] = None, bandwidth: int = 0,
             on_error: str = "report", start: Any = None) -> Tuple[PullJob, Optional[int]]:
    """Pull ``img`` showing ``progress`` until the job ends; ``start`` starts the pull
    instead of ``img.pull`` (same arguments), e.g. a QMP control socket's.

    Returns the ended job and the number of the signal that aborted it, if SIGINT or
    SIGTERM did: the job is then aborted cleanly (the image stays valid and backed).
    """
    events: "queue.SimpleQueue[PullEvent]" = queue.SimpleQueue()
    resume_asked: List[bool] = []
    job = (start or img.pull)(base=base, bandwidth=bandwidth, on_error=on_error,
                              on_event=events.put)
    signum: Optional[int] = None

    def drain() -> None:
        while True:
            try:
                ev = events.get_nowait()
            except queue.Empty:
                return
            if ev.kind not in _TERMINAL:
                progress.event(ev)

    try:
        with _abort_signals(lambda: resume_asked.append(True)):
            progress.start(job.info())
            while not job.wait(progress.interval):
                drain()
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
        # a second Ctrl-C must not leave the abort half done: ignore it while we wait
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            log.info("aborting the pull of %s (signal %d)", img.path, signum)
            job.abort(wait=True)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    drain()
    return job, signum


def _close_quietly(img: Image) -> None:
    """Close ``img`` when another error is already on its way: a failure to close is
    logged, not raised over it."""
    try:
        img.close()
    except Exception as exc:
        log.warning("closing %s after the failed pull: %s", img.path, exc)


def cmd_pull(args: argparse.Namespace) -> int:
    """``blockpull pull``: pull the chain into PATH with progress, Ctrl-C aborts cleanly."""
    json_lines = args.output == "json"
    show_bar = args.progress if args.progress is not None else \
        (not json_lines and sys.stderr.isatty())
    img = _open(args, readonly=False)
    try:
        progress = Progress(show_bar, json_lines, os.path.basename(img.path))
        control = None
        if args.control:   # QMP steering: the pull is the job "top"; quit aborts it
            from blockpull.qmp import ControlServer

            def _quit() -> None:
                if img.job is not None:
                    img.job.abort(wait=False)
            control = ControlServer(args.control, img, img.pull, on_quit=_quit)
        try:
            job, signum = run_pull(img, progress, base=args.base, bandwidth=args.bandwidth,
                                   on_error=args.on_error,
                                   start=control.start if control else None)
        finally:
            if control is not None:
                control.close()
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
              + f" in {info.elapsed:.1f} s ({rate:.1f} MiB/s); {now}")
    return EXIT_OK


# ---- check ------------------------------------------------------------------------------


def check_summary(res: "blockpull.CheckResult") -> str:
    """What ``qemu-img check`` prints on stdout for this result, byte for byte: after a
    repair, what was repaired and the result of checking the image again; the counts;
    the allocation line (when anything is allocated) with fragmentation; the image end
    offset (QED has none)."""
    out = []
    if res.leaks_fixed:
        out.append(f"The following inconsistencies were found and repaired:\n\n"
                   f"    {res.leaks_fixed} leaked clusters\n    0 corruptions\n\n"
                   f"Double checking the fixed image now...\n")
    if not (res.corruptions or res.leaks or res.check_errors):
        out.append("No errors were found on the image.\n")
    if res.corruptions:
        out.append(f"\n{res.corruptions} errors were found on the image.\n"
                   f"Data may be corrupted, or further writes to the image may corrupt it.\n")
    if res.leaks:
        out.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                   f"This means waste of disk space, but no harm to data.\n")
    if res.check_errors:
        out.append(f"\n{res.check_errors} internal errors have occurred during the check.\n")
    total, allocated = res.total_clusters, res.allocated_clusters
    if total and allocated:
        out.append(f"{allocated}/{total} = {100.0 * allocated / total:.2f}% allocated, "
                   f"{100.0 * res.fragmented_clusters / allocated:.2f}% fragmented, "
                   f"{100.0 * res.compressed_clusters / allocated:.2f}% compressed clusters\n")
    if res.image_end_offset and res.format != "qed":
        out.append(f"Image end offset: {res.image_end_offset}\n")
    return "".join(out)


def cmd_check(args: argparse.Namespace) -> int:
    """``blockpull check``: metadata consistency, with qemu-img check's exit codes; one
    line per finding, then qemu-img check's summary byte for byte."""
    if args.repair and args.force_share:
        raise UsageError("-U cannot be used with -r: a repair writes to the image")
    opening = contextlib.nullcontext() if args.repair else _suggest_force_share()
    try:
        with opening:
            res = blockpull.check(args.path, repair=bool(args.repair), format=args.fmt,
                                  force_share=args.force_share)
    except (BlockpullError, OSError) as exc:
        # exit 2 means "corrupt" for check: an image that could not be checked (missing,
        # not an image, a feature not supported here) is exit 1, "check incomplete"
        _code, msg = _message(exc)
        raise OperationFailed(f"{msg} (check incomplete: nothing was checked or repaired)") \
            from exc
    if args.output == "json":
        print(json.dumps(res.to_json(), indent=4))
        return res.exit_code
    for m in res.messages:
        print(m)
    sys.stdout.write(check_summary(res))
    return res.exit_code


# ---- demo -------------------------------------------------------------------------------

DEMO_DATA = 384 * MiB
DEMO_BANDWIDTH = 128 * MiB
_DIGEST_BLOCK = MiB
_STAMP_EVERY = 64 << 10


class _Pools:
    """Source material for demo data: random bytes (like compressed or encrypted files),
    text (like logs and configs) and binary records (like a database), each 4 MiB."""

    def __init__(self, rng: random.Random) -> None:
        n = 4 * MiB
        self.random = rng.randbytes(n)
        words = ["kernel", "disk", "sda1", "eth0", "systemd", "started", "stopped", "user",
                 "session", "cron", "backup", "completed", "error", "warning", "mounted",
                 "/var/lib", "/etc/hosts", "connection", "from", "port", "accepted", "key"]
        lines = []
        total = 0
        i = 0
        while total < n:
            line = (f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:"
                    f"{(i * 7) % 60:02d} host{i % 5} "
                    + " ".join(rng.choice(words) for _ in range(3 + i % 9))
                    + f" id={rng.getrandbits(32):08x}\n")
            lines.append(line)
            total += len(line)
            i += 1
        self.text = "".join(lines).encode()[:n]
        rec = struct.Struct("<QQd8s")
        self.records = b"".join(rec.pack(i, (i * 2654435761) & 0xFFFFFFFF, i / 7.0,
                                         b"row%05d" % (i % 100000))
                                for i in range(n // rec.size + 1))[:n]

    def fill(self, rng: random.Random, vaddr: int, length: int) -> bytearray:
        """``length`` bytes of one kind, stamped with their disk offset every 64 KiB so
        that no two clusters of the demo disk are alike."""
        pool = rng.choice((self.random, self.random, self.text, self.records))
        start = rng.randrange(len(pool))
        buf = bytearray()
        while len(buf) < length:
            take = min(length - len(buf), len(pool) - start)
            buf += pool[start:start + take]
            start = 0
        first = -vaddr % _STAMP_EVERY
        for off in range(first, length - 7, _STAMP_EVERY):
            struct.pack_into("<Q", buf, off, vaddr + off)
        return buf


class DemoChain(NamedTuple):
    """The chain ``build_demo_chain`` made."""
    template: str
    overlay: str
    virtual_size: int
    template_data: int
    template_extents: int
    overlay_data: int
    overlay_writes: int
    overlay_zeroed: int


def build_demo_chain(directory: str, data_size: int, seed: int = 2024) -> DemoChain:
    """A qcow2 template with ``data_size`` bytes of varied data in extents of varied sizes
    spread over a disk four times as large, and a qcow2 overlay on it with writes of its
    own (unaligned ones, and zeroed ranges over the template's data)."""
    rng = random.Random(seed)
    pools = _Pools(rng)
    data_size = max(_STAMP_EVERY, data_size - data_size % 4096)
    vsize = max(16 * MiB, -(-4 * data_size // (64 * MiB)) * 64 * MiB)
    template = os.path.join(directory, "template.qcow2")
    overlay = os.path.join(directory, "vm.qcow2")
    for p in (template, overlay):
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists: give an empty directory or remove it")

    # extents: lengths from 4 KiB to 16 MiB (capped by the data size), placed in order
    # with random gaps between them
    biggest = max(64 << 10, min(16 * MiB, data_size // 8))
    lengths: List[int] = []
    left = data_size
    while left > 0:
        n = min(left, rng.choice((4 << 10, 60 << 10, 256 << 10, 1 * MiB, 3 * MiB, biggest)))
        n = min(left, max(4096, n - rng.randrange(0, n // 2 + 1) // 4096 * 4096))
        lengths.append(n)
        left -= n
    slack = (vsize - data_size) // 4096
    cuts = sorted(rng.randrange(slack + 1) * 4096 for _ in lengths)
    blockpull.create(template, vsize)
    pos = 0
    with blockpull.open(template) as img:
        for n, gap in zip(lengths, cuts):
            start = pos + gap
            done = 0
            while done < n:   # chunks of up to 4 MiB keep memory small
                k = min(4 * MiB, n - done)
                img.write(start + done, pools.fill(rng, start + done, k))
                done += k
            pos += n
        img.flush()

    blockpull.create(overlay, 0, backing=os.path.basename(template), backing_format="qcow2")
    written = writes = zeroed = 0
    with blockpull.open(overlay) as img:
        budget = max(64 << 10, data_size // 16)
        while written < budget:
            n = rng.choice((512, 4096, 10_000, 65536, 200_000, 1 * MiB))
            off = rng.randrange(0, vsize - n)
            img.write(off, pools.fill(rng, off, n))
            written += n
            writes += 1
        starts = list(zip(lengths, cuts))
        pos = 0
        for i, (n, gap) in enumerate(starts):
            if i % 9 == 4 and n >= 128 << 10:   # zero part of some template extents
                zn = n // 2
                img.write_zeroes(pos + gap + (64 << 10), zn)
                zeroed += zn
            pos += n
        img.flush()
    return DemoChain(template, overlay, vsize, data_size, len(lengths), written, writes, zeroed)


def content_digest(img: Image) -> str:
    """SHA-256 (64 hex digits) of the whole virtual disk ``img`` reads through its chain,
    byte for byte from offset 0 to its virtual size: the digest ``sha256sum`` prints for
    the raw disk (``qemu-img convert -O raw IMAGE disk.raw; sha256sum disk.raw``).

    Ranges the map says read as zeros are hashed as zeros without being read.
    """
    digest = hashlib.sha256()
    buf = bytearray(_DIGEST_BLOCK)
    view = memoryview(buf)
    zeros = memoryview(bytes(_DIGEST_BLOCK))
    for e in img.map():
        pos, end = e.start, e.start + e.length
        while pos < end:
            n = min(_DIGEST_BLOCK, end - pos)
            if e.data or not e.zero:
                img.readinto(pos, view[:n])
                digest.update(view[:n])
            else:
                digest.update(zeros[:n])
            pos += n
    return digest.hexdigest()


def _chain_text(img: Image) -> str:
    return " -> ".join(f"{os.path.basename(c.path)} ({c.format})" for c in img.chain) + \
        ("" if len(img.chain) > 1 else ", no backing file")


def cmd_demo(args: argparse.Namespace) -> int:
    """``blockpull demo``: build a sample chain, pull it, verify it, summarise."""
    if args.directory is not None:
        directory = _kernel_abspath(args.directory)
        os.makedirs(directory, exist_ok=True)
        remove = False
    else:
        directory = tempfile.mkdtemp(prefix="blockpull-demo-")
        remove = not args.keep
    try:
        return _demo(args, directory, remove)
    finally:
        if remove:
            shutil.rmtree(directory, ignore_errors=True)


def _demo(args: argparse.Namespace, directory: str, removing: bool) -> int:
    json_out = args.output == "json"
    show_bar = args.progress if args.progress is not None else \
        (not json_out and sys.stderr.isatty())

    def say(text: str = "") -> None:
        if not json_out:
            print(text, flush=True)

    say(f"blockpull demo in {directory}")
    t0 = time.monotonic()
    built = build_demo_chain(directory, args.size)
    t_build = time.monotonic() - t0
    say(f"built a chain with blockpull's own create and write in {t_build:.1f} s:")
    say(f"  template.qcow2  {format_size(built.virtual_size)} disk, "
        f"{format_size(built.template_data)} of data in {built.template_extents} extents "
        f"(random, text and record-like)")
    say(f"  vm.qcow2        overlay on template.qcow2 with {built.overlay_writes} writes "
        f"of its own ({format_size(built.overlay_data)}), {format_size(built.overlay_zeroed)} "
        f"zeroed")

    with blockpull.open(built.overlay) as img:
        before = _chain_text(img)
        want = content_digest(img)
        say(f"content of the chain: sha256 {want}")
        limit = f"at up to {format_size(args.bandwidth)}/s" if args.bandwidth else "unlimited"
        say(f"pulling vm.qcow2 {limit} (Ctrl-C aborts cleanly)")
        progress = Progress(show_bar, False, "vm.qcow2")
        job, signum = run_pull(img, progress, bandwidth=args.bandwidth)
        info = job.info()
        progress.finish(info, job.status, job.error, img.backing_name)
    if signum is not None and job.status == "cancelled":
        print(f"{PROG}: demo aborted at {format_size(info.cur)} of {format_size(info.end)}",
              file=sys.stderr)
        return 128 + signum
    if job.status != "completed":
        raise OperationFailed(f"demo pull {job.status}: {job.error}")

    with blockpull.open(built.overlay, readonly=True) as img:
        after = _chain_text(img)
        got = content_digest(img)
        standalone = img.backing is None and len(img.chain) == 1
    if got != want or not standalone:
        raise OperationFailed(
            f"demo verification failed: {built.overlay} "
            + ("reads differently from the chain it came from" if got != want
               else "still has a backing file")
            + f" (kept in {directory}; please report this)")
    checked = None
    check = getattr(blockpull, "check", None)
    if callable(check):
        checked = check(built.overlay)
        if checked.exit_code != 0:
            raise OperationFailed(f"demo: check of {built.overlay} found problems: "
                                  f"{checked.corruptions} corruptions, {checked.leaks} leaks")

    rate = info.copied_bytes / info.elapsed / MiB if info.elapsed > 0 else 0.0
    if json_out:
        _emit_json({"directory": directory, "kept": not removing,
                    "virtual_size": built.virtual_size, "template_data": built.template_data,
                    "overlay_data": built.overlay_data, "before": before, "after": after,
                    "copied_bytes": info.copied_bytes, "zeroed_bytes": info.zeroed_bytes,
                    "seconds": round(info.elapsed, 3), "mib_per_s": round(rate, 1),
                    "bandwidth": args.bandwidth, "digest": got, "verified": True,
                    "check_clean": None if checked is None else checked.exit_code == 0},
                   sys.stdout)
        return EXIT_OK
    say(f"before: {before}")
    say(f"after:  {after}")
    say(f"copied {format_size(info.copied_bytes)} in {info.elapsed:.1f} s ({rate:.1f} MiB/s)")
    say(f"verified: vm.qcow2 reads exactly what the chain read (sha256 {got}) "
        f"and has no backing file"
        + ("; check finds no errors" if checked is not None else ""))
    if removing:
        say(f"removed {directory} (--keep keeps it)")
    else:
        say(f"kept {directory}; try: blockpull info {built.overlay}")
        say(f"the sha256 is that of the raw disk: qemu-img convert -O raw "
            f"{built.overlay} vm.raw && sha256sum vm.raw")
    return EXIT_OK


# ---- errors and the entry point ---------------------------------------------------------


_OS_TEXT = ((FileNotFoundError, "no such file or directory; check the path"),
            (FileExistsError, "already exists; remove it or choose another name"),
            (IsADirectoryError, "is a directory, not an image"),
            (NotADirectoryError, "a part of the path is not a directory"),
            (PermissionError, "permission denied; check the file's owner and mode"))


def _message(exc: BaseException) -> Tuple[int, str]:
    """The exit code and the one-line message for an exception a command raised."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OperationFailed):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, BackingChainError):
        return EXIT_USAGE, str(exc).replace("pass backing_format= to name it",
                                            "name it with -F/--backing-format")
    if isinstance(exc, BlockpullError):
        # not an image / malformed / unsupported (ImageFormatError), or no such image
        bad_input = isinstance(exc, (ValueError, FileNotFoundError))
        text = str(exc).replace("backing_format='raw' (-F raw on the command line)", "-F raw") \
            .replace("(format='raw'; -f raw on the command line)", "(-f raw)")\
            .replace("give tls=(certfile, keyfile[, cafile])", "give --tls-cert and --tls-key")
        return (EXIT_USAGE if bad_input else EXIT_FAILED), text
    if isinstance(exc, OSError):
        text = next((t for cls, t in _OS_TEXT if isinstance(exc, cls)), None) \
            or exc.strerror or str(exc)
        bad_input = isinstance(exc, tuple(cls for cls, _t in _OS_TEXT[:4]))
        name = exc.filename
        return (EXIT_USAGE if bad_input else EXIT_FAILED), (f"{name}: {text}" if name else text)
    if isinstance(exc, ValueError):
        return EXIT_USAGE, str(exc)
    return EXIT_FAILED, (f"unexpected {type(exc).__name__}: {exc} (run with --debug for the "
                         f"traceback, and please report it)")


def _setup_logging(verbosity: int) -> None:
    if verbosity <= 0:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``blockpull`` command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        _setup_logging(args.verbose)
        return int(args.func(args))
    except SystemExit as exc:        # --help, --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (| head): say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        code, msg = _message(exc)
        if debug:
            traceback.print_exc()
        msg = " ".join(str(msg).split()) or type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return code
