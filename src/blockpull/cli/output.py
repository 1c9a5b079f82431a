"""How the commands show things: JSON lines, text tables, and a running pull (a tqdm bar
on stderr, JSON lines on stdout, or nothing)."""
from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, TextIO

from tqdm import tqdm  # type: ignore[import-untyped]

from blockpull.cli.common import PROG, TERMINAL, MiB
from blockpull.job import PullEvent, PullInfo
from blockpull.units import format_size

__all__ = ["emit_json", "table", "Progress"]


def emit_json(obj: Any, out: TextIO) -> None:
    """``obj`` as one JSON line on ``out``, flushed."""
    out.write(json.dumps(obj) + "\n")
    out.flush()


def table(rows: Sequence[Sequence[str]], indent: int = 0) -> List[str]:
    """``rows`` as text lines, columns left-aligned two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(" " * indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip()
            for r in rows]


# ---- a running pull -----------------------------------------------------------------------


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
            emit_json({"type": "progress", **_info_json(info)}, self.out)

    def event(self, ev: PullEvent) -> None:
        """Show an event of a running job (paused, resumed, error)."""
        if self.json_lines:
            emit_json({"type": "event", "event": ev.kind, **_info_json(ev.info),
                       "error": _error_json(ev.error)}, self.out)
        if ev.kind == "error" and ev.error is not None:
            self.message(f"{PROG}: I/O error: {ev.error}")
            if ev.job.on_error == "stop":
                self.message(f"{PROG}: pull paused; send SIGUSR1 (kill -USR1 {os.getpid()}) "
                             f"to retry, Ctrl-C to abort")

    def drain(self, events: "queue.SimpleQueue[PullEvent]") -> None:
        """Show the events queued so far, except those that end the job (``finish``
        shows the end)."""
        while True:
            try:
                ev = events.get_nowait()
            except queue.Empty:
                return
            if ev.kind not in TERMINAL:
                self.event(ev)

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
            emit_json({"type": "event", "event": kind, **_info_json(info),
                       "backing": backing, "error": _error_json(error)}, self.out)
