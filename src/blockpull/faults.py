"""Fault injection and write recording for tests of crash safety and error handling.

Nothing here runs unless a test attaches it: an open file consults its ``faults`` object
only when one is set (one pointer comparison otherwise).

``FaultInjector`` fails chosen operations with an errno::

    inj = FaultInjector()
    inj.fail("read", role="backing", errno=errno.EIO)                 # every backing read
    inj.fail("write", role="top", errno=errno.ENOSPC, nth=7)          # the 7th top write only
    inj.fail("write", offset=(0, 512), times=None)                    # always, first sector
    inj.fail("sync", nth=3, kill=True)                                # SIGKILL this process
    attach(image, inj)

and records, in order, every write (with the bytes that reached the file), every sync,
resize and hole punch of the files it is attached to (``inj.log``). ``Replayer`` turns such
a record into the states a disk could hold after a power cut.
"""
from __future__ import annotations

import errno as _errno
import os
import random
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

__all__ = ["FaultInjector", "Rule", "Op", "attach", "detach", "files_of", "Replayer"]

OPS = ("read", "write", "sync")
ROLES = ("top", "backing", "data")     # "data": an image's external data file


class Op(NamedTuple):
    """One recorded operation: ``op`` "write" (``data`` the bytes written), "sync",
    "syncfail" (an fdatasync the injector failed), "truncate" (``offset`` = new size),
    "zero" (``data`` = length), or "mark" (a note the test made; ``data`` its payload)."""
    op: str
    path: Optional[str]
    offset: int
    data: Any


class Rule:
    """Fail (or kill at) the operations that match.

    ``op`` "read" / "write" / "sync" (or None for any), ``role`` "top" / "backing" /
    "data" (an external data file; None: any), ``offset`` a (start, end) byte range the operation must overlap (None: any),
    ``match`` an extra predicate ``(op, role, offset,
    length) -> bool``. Counting starts at the first matching call: the rule fires on the
    ``nth`` match (1-based) and then ``times`` times in a row (None: for ever).
    ``kill`` sends SIGKILL to this process instead of failing (a crash at that instant).
    """

    def __init__(self, op: Optional[str] = None, role: Optional[str] = None,
                 errno: int = _errno.EIO, offset: Optional[Tuple[int, int]] = None,
                 nth: int = 1, times: Optional[int] = 1,
                 match: Optional[Callable[[str, str, int, int], bool]] = None,
                 kill: bool = False) -> None:
        if op is not None and op not in OPS:
            raise ValueError(f"op must be one of {OPS}")
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if nth < 1:
            raise ValueError("nth counts from 1")
        self.op, self.role, self.errno = op, role, errno
        self.offset, self.nth, self.times = offset, nth, times
        self.match, self.kill = match, kill
        self.seen = 0      # matching calls so far
        self.fired = 0     # calls failed

    def matches(self, op: str, role: str, offset: int, length: int) -> bool:
        if self.op is not None and op != self.op:
            return False
        if self.role is not None and role != self.role:
            return False
        if self.offset is not None:
            lo, hi = self.offset
            if not (offset < hi and offset + max(length, 1) > lo):
                return False
        if self.match is not None and not self.match(op, role, offset, length):
            return False
        return True

    def hit(self) -> bool:
        """Count one matching call; True if this one fails."""
        self.seen += 1
        if self.seen < self.nth:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def __repr__(self) -> str:
        return (f"Rule(op={self.op!r}, role={self.role!r}, errno={self.errno}, "
                f"offset={self.offset}, nth={self.nth}, times={self.times}, "
                f"seen={self.seen}, fired={self.fired}, kill={self.kill})")


class FaultInjector:
    """What ``File.faults`` holds: fails operations by rule and records what was done.

    ``record_writes`` (default True) keeps every write's bytes in ``log``; ``counts`` has
    the number of calls per (op, role). Thread-safe.
    """

    def __init__(self, record_writes: bool = True) -> None:
        self.rules: List[Rule] = []
        self.log: List[Op] = []
        self.record_writes = record_writes
        self.counts: Dict[Tuple[str, str], int] = {}
        self.failures: List[Tuple[str, str, int, int, int]] = []   # (op, role, off, len, errno)
        self._lock = threading.Lock()

    # ---- rules ------------------------------------------------------------------

    def fail(self, op: Optional[str] = None, role: Optional[str] = None,
             errno: int = _errno.EIO, **kw: Any) -> Rule:
        """Add a rule (see ``Rule``) and return it."""
        r = Rule(op, role, errno, **kw)
        with self._lock:
            self.rules.append(r)
        return r

    def kill_at(self, op: Optional[str] = None, role: Optional[str] = None, **kw: Any) -> Rule:
        """SIGKILL this process at the matching call, before it reaches the file."""
        return self.fail(op, role, kill=True, **kw)

    def clear(self) -> None:
        """Drop every rule (the device is healthy again)."""
        with self._lock:
            self.rules = []

    def mark(self, data: Any = None) -> None:
        """Put a note into the log (e.g. "the guest's flush returned")."""
        with self._lock:
            self.log.append(Op("mark", None, 0, data))

    # ---- the File interface ---------------------------------------------------------

    def check(self, op: str, role: str, offset: int, length: int) -> int:
        with self._lock:
            key = (op, role)
            self.counts[key] = self.counts.get(key, 0) + 1
            for r in self.rules:
                if r.matches(op, role, offset, length) and r.hit():
                    if r.kill:
                        os.kill(os.getpid(), signal.SIGKILL)
                    self.failures.append((op, role, offset, length, r.errno))
                    return r.errno
        return 0

    def record(self, op: str, path: str, offset: int, data: Any) -> None:
        with self._lock:
            if op == "write" and not self.record_writes:
                data = len(data)
            self.log.append(Op(op, path, offset, data))

    # ---- looking at the record ----------------------------------------------------

    def ops(self, path: Optional[str] = None) -> List[Op]:
        """The log for one file (marks included)."""
        with self._lock:
            log = list(self.log)
        if path is None:
            return log
        path = os.path.abspath(path)
        return [o for o in log if o.path is None or os.path.abspath(o.path) == path]


# ---- attaching ---------------------------------------------------------------------

def files_of(image: Any) -> list:
    """The open ``File`` objects of an Image's chain, top first, then the external data
    files of its images (role "data"), top first."""
    return [d.file for d in image.layers] + \
        [d.data_file for d in image.layers if d.data_file is not None]


def attach(image: Any, injector: Optional[FaultInjector]) -> Optional[FaultInjector]:
    """Set ``injector`` as the ``faults`` of every file of ``image`` (None detaches)."""
    with image.lock:
        for f in files_of(image):
            f.faults = injector
    return injector


def detach(image: Any) -> None:
    attach(image, None)


# ---- power-loss states ---------------------------------------------------------------

SECTOR = 512


class Replayer:
    """Rebuild a file as a disk could hold it after a power cut, from its content before
    the recorded operations (``initial``) and the record of one file (``ops``).

    Sync ``k`` (0 = none yet) makes every operation before it durable. A cut after sync
    ``k`` keeps that durable prefix plus any subset of the writes made after it (until the
    next sync completes), each of them possibly torn: only some of its 512-byte sectors
    reach the disk. Resizes after the last sync may or may not have happened.

    A failed sync ("syncfail") loses the writes made since the sync or failed sync
    before it: after a failed fdatasync Linux may drop those dirty pages, and a later
    fdatasync succeeds without writing them. So they are never part of a durable prefix
    (a later good sync does not save them); only a cut before the next good sync may
    still find some of them on the disk. Counted syncs ``k`` are the good ones.
    """

    def __init__(self, initial: bytes, ops: Sequence[Op]) -> None:
        self.initial = bytes(initial)
        self.ops = [o for o in ops if o.op != "mark"]
        self.sync_at = [i for i, o in enumerate(self.ops) if o.op == "sync"]
        self._durable_cache: Dict[int, bytearray] = {}
        # writes a failed sync lost: those since the previous sync or failed sync
        self.lost: set = set()
        since = 0
        for i, o in enumerate(self.ops):
            if o.op == "sync":
                since = i + 1
            elif o.op == "syncfail":
                self.lost.update(j for j in range(since, i) if self.ops[j].op == "write")
                since = i + 1

    @property
    def nsyncs(self) -> int:
        return len(self.sync_at)

    def segment(self, k: int) -> Tuple[int, int]:
        """Indexes [start, end) of the operations between sync k and sync k+1."""
        start = 0 if k == 0 else self.sync_at[k - 1] + 1
        end = self.sync_at[k] if k < len(self.sync_at) else len(self.ops)
        return start, end

    @staticmethod
    def _apply(buf: bytearray, o: Op, sectors: Optional[Sequence[int]] = None) -> None:
        if o.op == "write":
            data = o.data
            end = o.offset + len(data)
            if len(buf) < end:
                buf.extend(bytes(end - len(buf)))
            if sectors is None:
                buf[o.offset:end] = data
                return
            for s in sectors:   # absolute sector numbers inside the write
                lo = max(o.offset, s * SECTOR)
                hi = min(end, (s + 1) * SECTOR)
                buf[lo:hi] = data[lo - o.offset:hi - o.offset]
        elif o.op == "truncate":
            if o.offset < len(buf):
                del buf[o.offset:]
            else:
                buf.extend(bytes(o.offset - len(buf)))
        elif o.op == "zero":
            end = min(o.offset + o.data, len(buf))
            if end > o.offset:
                buf[o.offset:end] = bytes(end - o.offset)

    def durable(self, k: int) -> bytearray:
        """The file once sync k completed: the initial content and every operation
        before sync k, except the writes a failed sync lost."""
        if k in self._durable_cache:
            return bytearray(self._durable_cache[k])
        best = max([j for j in self._durable_cache if j < k], default=None)
        if best is None:
            buf, i = bytearray(self.initial), 0
        else:
            buf = bytearray(self._durable_cache[best])
            i = self.sync_at[best - 1] if best > 0 else 0
        stop = self.sync_at[k - 1] if k > 0 else 0
        for j in range(i, stop):
            if j not in self.lost:
                self._apply(buf, self.ops[j])
        self._durable_cache[k] = bytes(buf)  # type: ignore[assignment]
        if len(self._durable_cache) > 8:
            self._durable_cache.pop(min(self._durable_cache))
        return buf

    def state(self, k: int, rng: random.Random, p_keep: float = 0.5,
              p_torn: float = 0.3) -> Tuple[bytes, str]:
        """A random state after sync k: (file content, description)."""
        buf = self.durable(k)
        start, end = self.segment(k)
        kept = []
        for i in range(start, end):
            o = self.ops[i]
            if rng.random() >= p_keep:
                continue
            sectors = None
            if o.op == "write" and len(o.data) > 0 and rng.random() < p_torn:
                first = o.offset // SECTOR
                last = (o.offset + len(o.data) - 1) // SECTOR
                allsec = list(range(first, last + 1))
                sectors = [s for s in allsec if rng.random() < 0.5]
                kept.append(f"{i}:torn{len(sectors)}/{len(allsec)}")
            else:
                kept.append(str(i))
            self._apply(buf, o, sectors)
        return bytes(buf), f"sync {k}/{self.nsyncs}, ops {start}..{end}, kept [{' '.join(kept)}]"

    def states(self, rng: random.Random, per_sync: int = 3) -> Iterator[Tuple[int, bytes, str]]:
        """For each sync point: the durable prefix alone, everything up to the next sync,
        and ``per_sync`` random subsets with torn writes in between."""
        for k in range(self.nsyncs + 1):
            start, end = self.segment(k)
            yield k, bytes(self.durable(k)), f"sync {k}/{self.nsyncs}, nothing after"
            if end > start:
                full = self.durable(k)
                for o in self.ops[start:end]:
                    self._apply(full, o)
                yield k, bytes(full), f"sync {k}/{self.nsyncs}, all of ops {start}..{end}"
                for _ in range(per_sync):
                    data, desc = self.state(k, rng)
                    yield k, data, desc
