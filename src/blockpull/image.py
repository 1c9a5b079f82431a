"""Opening and creating images, and the ``Image`` object people read, write and pull."""
from __future__ import annotations

import contextlib
import errno as _errno
import json
import logging
import os
import re
import stat
import threading
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, List, NamedTuple, Optional,
                    Tuple, Union)

from blockpull import _qcow2, _qed, _raw
from blockpull._chain import Chain
from blockpull._driver import COMPRESSED, DATA, UNALLOC, ZERO
from blockpull._fileio import File
from blockpull._inflight import copy_on_read
from blockpull.errors import (BackingChainError, BlockpullError, ImageFormatError,
                              ImageLockedError, ImageNotFoundError)
from blockpull.job import PullJob

if TYPE_CHECKING:  # pragma: no cover
    from blockpull._driver import Driver
    from blockpull._stream import Stream
    from blockpull.budget import Budget

log = logging.getLogger("blockpull")

__all__ = ["create", "open", "Image", "ChainEntry", "Extent", "MAX_CHAIN_DEPTH"]

#: the format drivers: name -> (driver class, probe(head) -> bool, create function)
DRIVERS: Dict[str, Any] = {
    "qcow2": (_qcow2.Qcow2, _qcow2.probe, _qcow2.create),
    "qed": (_qed.Qed, _qed.probe, _qed.create),
    "raw": (_raw.Raw, _raw.probe, None),
}

#: the most images a chain may hold, the top included (libvirt's cap; QEMU has none)
MAX_CHAIN_DEPTH = 200
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
#: the formats a backing's magic may show when an image records no backing format
_PROBED_FORMATS = ("qcow2", "qed")
#: the format drivers a ``json:`` backing name may name over its ``file`` child
_JSON_FORMATS = ("qcow2", "qed", "raw")

# QEMU's lock bytes: 100 + i "holds permission i", 200 + i "refuses to share i"
_PERM_READ, _PERM_WRITE, _PERM_WRITE_UNCHANGED, _PERM_RESIZE = 0, 1, 2, 3


class ChainEntry(NamedTuple):
    """One image of a backing chain."""
    path: str
    format: str
    size: int


class Extent(NamedTuple):
    """A run of the virtual disk that reads the same way (``qemu-img map`` semantics).

    ``depth`` is the chain index that provides it, ``present`` whether any image of the
    chain allocates it, ``offset`` the host offset in that image for plain data.
    """
    start: int
    length: int
    depth: int
    data: bool
    zero: bool
    present: bool = True
    offset: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        """The dict `qemu-img map --output=json` prints for this extent."""
        d: Dict[str, Any] = {"start": self.start, "length": self.length, "depth": self.depth,
                             "present": self.present, "zero": self.zero, "data": self.data}
        if self.offset is not None:
            d["offset"] = self.offset
        return d


def _probe_magic(f: File) -> Optional[str]:
    """The format the magic of the open file ``f`` shows: qcow2 or QED only (a header of
    its own, libvirt's rule for safe probing), else None: raw is never probed."""
    head = f.pread(0, 64)
    for name in _PROBED_FORMATS:
        if DRIVERS[name][1](head):
            return name
    return None


def _not_probed(path: str) -> ImageFormatError:
    return ImageFormatError(f"{path}: not a qcow2 or QED image; if it is raw, name the format "
                            f"(format='raw'; -f raw on the command line)")


def _refuse_fifo(path: str) -> None:
    """Raise ImageFormatError if ``path`` is a named pipe: opening one waits for a
    writer, for ever if none comes (a backing name can point at one)."""
    try:
        st = os.stat(path)
    except OSError:
        return      # opening it says what is wrong
    if stat.S_ISFIFO(st.st_mode):
        raise ImageFormatError(f"{path}: is a named pipe (FIFO), not an image file or "
                               f"block device")


def _probe_path(path: str, role: str, not_probed: Optional[BlockpullError] = None) -> str:
    """The format of the image at ``path``, from its magic (raw is never guessed).
    Raises ``not_probed`` (default: an ImageFormatError) when it shows no format."""
    _refuse_fifo(path)
    f = File(path, False, role)
    try:
        fmt = _probe_magic(f)
    finally:
        f.close()
    if fmt is None:
        raise not_probed or _not_probed(path)
    return fmt


def _open_driver(path: str, fmt: Optional[str], writable: bool, role: str,
                 not_probed: Optional[BlockpullError] = None):
    """Open ``path`` as ``fmt`` (None: by its qcow2/QED magic, raising ``not_probed``,
    default an ImageFormatError, when it shows neither)."""
    _refuse_fifo(path)
    try:
        f = File(path, writable, role)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise ImageFormatError(f"{path}: is a directory, not an image")
    try:
        if fmt is None:
            fmt = _probe_magic(f)
            if fmt is None:
                raise not_probed or _not_probed(path)
        if fmt not in DRIVERS:
            raise ImageFormatError(f"{path}: unsupported format {fmt!r} (qcow2, qed or raw)")
        cls = DRIVERS[fmt][0]
        if fmt == "raw" and writable:
            raise ImageFormatError(f"{path}: raw images can only be backing files")
        head = f.pread(0, 64)
        if fmt != "raw" and not DRIVERS[fmt][1](head):
            raise ImageFormatError(f"{path}: not a {fmt} image (bad magic)")
        return cls(f, writable)
    except BaseException:
        f.close()
        raise


_PERM_NAMES = {_PERM_READ: "consistent read", _PERM_WRITE: "write",
               _PERM_WRITE_UNCHANGED: "write unchanged", _PERM_RESIZE: "resize"}


#: how long a lock conflict may last before it is reported (see ``_lock``)
LOCK_GRACE = 0.25

_shared_reads = threading.local()


@contextlib.contextmanager
def _without_read_locks() -> Iterator[None]:
    """Within this block, in this thread, read-only opens take no lock bytes (QEMU's
    force-share, ``qemu-img -U``): they neither see nor stop a writer. Writable opens
    still lock."""
    before = getattr(_shared_reads, "on", False)
    _shared_reads.on = True
    try:
        yield
    finally:
        _shared_reads.on = before


def _lock(f: File, writable: bool, path: str) -> None:
    """Take the lock bytes (``_lock_once``), trying again for ``LOCK_GRACE`` seconds on
    a conflict before refusing.

    A conflict can be a ghost: when any thread of a program forks (to start any other
    program), the child holds a copy of every descriptor until it execs, and with it
    the OFD locks of an image that was just closed. Reopening that image at that moment
    would be refused although nobody uses it; the window lasts far less than the grace.
    """
    import time
    if not writable and getattr(_shared_reads, "on", False):
        return None
    deadline = time.monotonic() + LOCK_GRACE
    while True:
        try:
            return _lock_once(f, writable, path)
        except ImageLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _lock_once(f: File, writable: bool, path: str) -> None:
    """Take QEMU's OFD lock bytes as a qcow2 node of QEMU takes them, refusing on conflict.

    A writer holds consistent read, write and resize (bytes 100, 101, 103) and refuses
    to share write and resize (201, 203); a reader holds consistent read (100) and
    refuses to share write and resize as well, so neither opens an image that a VM or
    another pull writes (``qemu-img info`` without ``-U`` refuses the same way). As in
    QEMU, the bytes are taken first and conflicts tested after, so two openers racing
    cannot both miss each other.
    """
    perms = [_PERM_READ, _PERM_WRITE, _PERM_RESIZE] if writable else [_PERM_READ]
    unshared = [_PERM_WRITE, _PERM_RESIZE]
    taken = []
    try:
        for b in [100 + p for p in perms] + [200 + p for p in unshared]:
            if not f.lock(b, False):
                raise ImageLockedError(
                    f"{path}: lock byte {b} is held exclusively by another process; "
                    f"close the program that uses it first")
            taken.append(b)
        for p in perms:
            if f.lock_conflicts(200 + p, True):
                raise ImageLockedError(
                    f"{path}: another process (a VM or a pull) refuses to share "
                    f"{_PERM_NAMES[p]} access; stop it first, or use its own interface")
        for p in unshared:
            if f.lock_conflicts(100 + p, True):
                raise ImageLockedError(
                    f"{path}: another process (a VM or a pull) has it open with "
                    f"{_PERM_NAMES[p]} access; stop it first, or use its own interface")
    except BaseException:
        for b in taken:
            f.unlock(b)
        raise


def _tidy(path: str) -> str:
    """``path`` without "." components and repeated slashes, which never change the file
    a name reaches (a trailing slash is kept: it does). ".." is kept: after a symlinked
    directory it leads to the link target's parent, not to the parent in the text, so
    only the kernel may resolve it."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    out = ("/" if path.startswith("/") else "") + "/".join(parts)
    if parts and (path.endswith("/") or path.endswith("/.")):
        # a trailing slash says "a directory": the kernel refuses it after a file
        # (ENOTDIR), as QEMU then does; dropped, it would open the file
        out += "/"
    return out or "."


def _kernel_abspath(path: str) -> str:
    """An absolute name for ``path`` that the kernel resolves to the same file: joined
    to the working directory, ".." left for the kernel (``os.path.abspath`` would collapse
    it as text and, across a symlinked directory, name another file)."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    return _tidy(path)


def _identity(st: os.stat_result) -> tuple:
    """What tells one file from another, as ``File.identity`` gives it for an open file:
    (st_dev, st_ino), or (-1, st_rdev) for a block device (any of its device nodes)."""
    if stat.S_ISBLK(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


def _plain_name(name: str) -> str:
    """A backing name without its "file:" protocol prefix."""
    return name[5:] if name.startswith("file:") else name


def _flat_json(obj: Dict[str, Any], prefix: str, out: Dict[str, Any]) -> bool:
    """Flatten nested objects of a ``json:`` name into dotted keys ("file.filename"), as
    QEMU reads them; False if a key is given twice (nested and flat)."""
    for key, value in obj.items():
        full = prefix + key
        if isinstance(value, dict):
            if not _flat_json(value, full + ".", out):
                return False
        elif full in out:
            return False
        else:
            out[full] = value
    return True


def _json_backing(name: str) -> Optional[Tuple[str, str]]:
    """``(filename, format)`` of a ``json:`` backing name that opens a plain local file:
    exactly a format driver (qcow2, qed or raw) over a ``file`` child with a filename,
    nested (``"file": {"driver": "file", "filename": F}``) or flat (``"file.driver"``,
    ``"file.filename"``). None for any other shape (another protocol, extra options,
    malformed JSON)."""
    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        for k, v in items:
            if k in d:
                raise ValueError(f"key {k!r} given twice")
            d[k] = v
        return d
    try:
        obj = json.loads(name[5:], object_pairs_hook=pairs)
    except ValueError:
        return None
    flat: Dict[str, Any] = {}
    if not isinstance(obj, dict) or not _flat_json(obj, "", flat):
        return None
    if set(flat) != {"driver", "file.driver", "file.filename"}:
        return None
    fmt, proto, filename = flat["driver"], flat["file.driver"], flat["file.filename"]
    if fmt not in _JSON_FORMATS or proto != "file" or not isinstance(filename, str) \
            or not filename:
        return None
    return filename, fmt


def _local_name(name: str) -> Optional[str]:
    """The local file name a backing name stands for (without "file:", the filename of
    a plain-file ``json:`` name), or None for a protocol."""
    if name.startswith("json:"):
        parsed = _json_backing(name)
        return parsed[0] if parsed else None
    if _PROTOCOL.match(name) and not name.startswith("file:"):
        return None
    return _plain_name(name)


def _backing_target(name: str, parent: str) -> Tuple[str, Optional[str]]:
    """``(path, format)`` of backing file ``name`` recorded in the image at ``parent``.

    A relative name is joined to the directory of ``parent`` as it stands and resolved
    by the kernel when opened, as QEMU does (no ".." is collapsed as text). ``format``
    is the one a ``json:`` name gives (plain-file shapes only, see ``_json_backing``),
    else None. Raises BackingChainError for empty names, names with NUL, names over 1023
    bytes, and protocols other than "file:" (any other ``json:`` shape included)."""
    if not name:
        raise BackingChainError(f"{parent}: empty backing file name")
    if "\0" in name:
        raise BackingChainError(f"{parent}: backing file name contains NUL")
    if len(name.encode("utf-8", "surrogateescape")) > 1023:
        raise BackingChainError(f"{parent}: backing file name longer than 1023 bytes")
    local = _local_name(name)
    if local is None:
        raise BackingChainError(
            f"{parent}: backing file {name!r} is not a plain local path (protocols are refused)")
    parsed = _json_backing(name) if name.startswith("json:") else None
    fmt = parsed[1] if parsed else None
    if "\0" in local:
        raise BackingChainError(f"{parent}: backing file name contains NUL")
    if not os.path.isabs(local):
        local = os.path.join(os.path.dirname(_kernel_abspath(parent)), local)
    return _tidy(local), fmt


def _resolve_backing(name: str, parent: str) -> str:
    """The path of backing file ``name`` recorded in the image at ``parent`` (see
    ``_backing_target``). Raises BackingChainError for names that are not local files."""
    return _backing_target(name, parent)[0]


class Image:
    """An open image and its backing chain. Use ``blockpull.open`` to get one.

    Reads go through the whole chain; writes go to the top image with copy-on-write of
    partial clusters. All methods are thread-safe: a lock serialises metadata changes,
    so reads and writes may run from other threads while a pull runs.
    """

    def __init__(self, path: str, *, readonly: bool = False, copy_on_read: bool = False,
                 backing_format: Union[None, str, Dict[str, str]] = None,
                 format: Optional[str] = None, _lock_files: bool = True) -> None:
        self.path = _kernel_abspath(os.fspath(path))
        self.readonly = readonly
        self.copy_on_read = copy_on_read and not readonly
        self._lock = threading.RLock()
        self._job: Optional["PullJob"] = None
        self._closed = False
        self._drivers: list = []
        self._backing_format = backing_format
        try:
            self._open_chain(format, _lock_files)
        except BaseException:
            self._close_files()
            raise
        self.chain_obj = Chain(self._drivers)
        log.debug("opened %s: %s", self.path, self.chain)

    # ---- opening ----------------------------------------------------------------

    def _named_format(self, name: str, resolved: str) -> Optional[str]:
        bf = self._backing_format
        if bf is None:
            return None
        if isinstance(bf, str):
            return bf
        fmt = bf.get(name) or bf.get(resolved)
        if fmt is not None:
            return fmt
        # any other spelling of the same file (through symlinks, with ".." or not)
        try:
            want = os.stat(resolved)
        except OSError:
            return None
        for key, value in bf.items():
            try:
                st = os.stat(key)
            except OSError:
                continue
            if _identity(st) == _identity(want):
                return value
        return None

    def _backing_format_of(self, cur: Any, cur_path: str) -> Tuple[str, Optional[str]]:
        """``(path, format)`` of the backing of ``cur`` (the image at ``cur_path``).

        The format is the one the image records (qcow2's backing-format extension, QED's
        "raw" bit) or its ``json:`` backing name gives (the two must agree), else the one
        the caller names. None means "probe": only a QED image may leave its backing to
        the probe (QEMU probes there; the probe accepts qcow2 or QED magic, never raw).
        A qcow2 image without a recorded format is refused until the format is named.
        """
        name = cur.backing_name
        bpath, jfmt = _backing_target(name, cur_path)
        recorded = cur.backing_format
        if jfmt is not None and recorded is not None and jfmt != recorded:
            raise BackingChainError(
                f"{cur_path}: backing file {name!r} names format {jfmt!r} but the image "
                f"records {recorded!r}; fix the link (qemu-img rebase -u -b NAME -F FMT)")
        bfmt = recorded or jfmt or self._named_format(name, bpath)
        if bfmt is None and cur.format != "qed":
            raise BackingChainError(
                f"{cur_path}: backing file {name!r} has no recorded format; pass "
                f"backing_format= to name it (formats are never guessed)")
        if bfmt is not None and bfmt not in DRIVERS:
            raise BackingChainError(f"{cur_path}: backing format {bfmt!r} is not supported")
        return bpath, bfmt

    def _open_chain(self, fmt: Optional[str], lock_files: bool) -> None:
        if not os.path.exists(self.path):
            raise ImageNotFoundError(f"{self.path}: no such image file")
        top = _open_driver(self.path, fmt, not self.readonly, "top")
        self._drivers.append(top)
        if lock_files:
            _lock(top.file, not self.readonly, self.path)
        seen = {top.file.identity()}
        cur = top
        cur_path = self.path
        while cur.backing_name is not None:
            if len(self._drivers) >= MAX_CHAIN_DEPTH:
                raise BackingChainError(
                    f"{self.path}: backing chain deeper than {MAX_CHAIN_DEPTH} images; "
                    f"flatten part of it first (qemu-img commit or convert)")
            name = cur.backing_name
            bpath, bfmt = self._backing_format_of(cur, cur_path)
            if not os.path.exists(bpath):
                raise BackingChainError(f"{cur_path}: backing file {bpath} does not exist")
            unprobed = BackingChainError(
                f"{cur_path}: backing file {name!r} has no recorded format and its "
                f"header is neither qcow2 nor QED; pass backing_format= to name it "
                f"(formats are never guessed)")
            try:
                # bfmt None: QED recorded no format and none was named; the backing's own
                # magic decides, qcow2 or QED only (read from the file that is opened)
                drv = _open_driver(bpath, bfmt, False, "backing", unprobed)
            except ImageFormatError as exc:
                raise BackingChainError(f"{cur_path}: backing file unusable: {exc}") from exc
            except OSError as exc:
                raise BackingChainError(f"{cur_path}: cannot open backing file {bpath}: {exc.strerror}") from exc
            self._drivers.append(drv)
            ident = drv.file.identity()
            if ident in seen:
                raise BackingChainError(f"{self.path}: backing chain loops back to {bpath}")
            seen.add(ident)
            if lock_files:
                _lock(drv.file, False, bpath)
            cur, cur_path = drv, bpath

    # ---- properties -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self._top.size

    @property
    def format(self) -> str:
        """Format of the top image: "qcow2" or "qed"."""
        return self._top.format

    @property
    def cluster_size(self) -> int:
        """Cluster size of the top image in bytes."""
        return self._top.cluster_size

    @property
    def backing(self) -> Optional[str]:
        """Absolute path of the backing file, or None."""
        return self._drivers[1].file.path if len(self._drivers) > 1 else None

    @property
    def backing_name(self) -> Optional[str]:
        """The backing file name as the image records it, or None."""
        return self._top.backing_name

    @property
    def chain(self) -> List[ChainEntry]:
        """The images of the chain, top first."""
        return [ChainEntry(d.file.path, d.format, d.size) for d in self._drivers]

    @property
    def layers(self) -> "Tuple[Driver, ...]":
        """The open format drivers of the chain, top first (``layers[0]`` is the top,
        ``layers[i]`` the image ``chain[i]`` names). For tests and tools that look at
        one image of the chain (its tables, its ``file``); reading or writing through
        them bypasses the image lock and a running pull's bookkeeping."""
        return tuple(self._drivers)

    @property
    def lock(self) -> "threading.RLock":
        """The image lock (re-entrant): every metadata change of the top holds it, and
        a pull's job and copy loop take it; hold it to see the chain stand still."""
        return self._lock

    @property
    def _top(self):
        if self._closed:
            raise ValueError(f"{self.path}: image is closed")
        return self._drivers[0]

    @property
    def job(self) -> Optional["PullJob"]:
        """The pull job running (or last run) on this image, if any."""
        return self._job

    # ---- I/O --------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) outside the disk (size {self.size})")

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` through the chain."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any) -> int:
        """Read into a writable buffer (bytearray, memoryview, mmap...) without a copy."""
        mv = memoryview(buffer).cast("B")
        n = mv.nbytes
        self._check_range(offset, n)
        with self._lock:
            self._top  # closed check
            self.chain_obj.readinto(offset, mv, 0)
            if self.copy_on_read and len(self._drivers) > 1:
                self._copy_in(offset, n, mv)
        return n

    def pull_range(self, offset: int, length: int) -> None:
        """Copy what the top lacks under [offset, offset+length) (bytes) from the backing
        chain into the top now, as a copy-on-read would: whole clusters, all-zero ones
        left to the chain. Nothing happens on a read-only image or one without backing.
        Raises ValueError outside the disk, OSError on an I/O error."""
        self._check_range(offset, length)
        if self.readonly:
            return
        with self._lock:
            self._top  # closed check
            if len(self._drivers) > 1:
                self._copy_in(offset, length, None)

    def _copy_in(self, offset: int, length: int, buf: Any) -> None:
        """Copy-on-read of [offset, offset+length), ``buf`` holding what the chain reads
        there or None (the lock held); a running pull counts what it fills."""
        st, token = self._filling(offset, length)
        try:
            copy_on_read(self.chain_obj, offset, length, buf,
                         st.flight if st is not None else None)
        finally:
            if st is not None:
                st.guest_write_end(offset, length, token)

    def _stream(self) -> "Optional[Stream]":
        """The copy loop of the pull running on this image, or None."""
        job = self._job
        if job is None or job.done():
            return None
        return job.stream

    def _filling(self, offset: int, length: int) -> "tuple[Any, int]":
        """Before a write into the top (the lock held): the running pull's stream and
        its token, so that what the write fills counts as done in its progress; call
        ``stream.guest_write_end(offset, length, token)`` after the write."""
        st = self._stream()
        if st is None:
            return None, 0
        return st, st.guest_write_begin(offset, length)

    def _await_copies(self, offset: int, length: int) -> None:
        """Before a write into the top (the lock held): wait, the lock released meanwhile,
        for the running pull to link any copy of a cluster under [offset, offset+length)
        that it is writing now. The write then finds that cluster allocated and writes in
        place, instead of beating the copy and leaving its space unreferenced (a leak on
        QED, which keeps no refcounts). The wait lasts one chunk's write at most."""
        st = self._stream()
        if st is not None:
            st.await_copies(offset, length)

    def write(self, offset: int, data: Any) -> None:
        """Write ``data`` at ``offset`` (any alignment; partial clusters copy-on-write)."""
        if self.readonly:
            raise PermissionError(f"{self.path}: image is open read-only")
        mv = memoryview(data).cast("B")
        self._check_range(offset, mv.nbytes)
        if not mv.nbytes:
            return
        with self._lock:
            top = self._top
            self._await_copies(offset, mv.nbytes)
            st, token = self._filling(offset, mv.nbytes)
            try:
                top.write(offset, mv, self.chain_obj.filler(1))
            finally:
                if st is not None:
                    st.guest_write_end(offset, mv.nbytes, token)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros, with zero clusters where the format has them."""
        if self.readonly:
            raise PermissionError(f"{self.path}: image is open read-only")
        self._check_range(offset, length)
        with self._lock:
            top = self._top
            self._await_copies(offset, length)
            st, token = self._filling(offset, length)
            try:
                if hasattr(top, "write_zeroes"):
                    top.write_zeroes(offset, length, self.chain_obj.filler(1),
                                     len(self._drivers) > 1)
                else:
                    top.write(offset, bytes(length), self.chain_obj.filler(1))
            finally:
                if st is not None:
                    st.guest_write_end(offset, length, token)

    def flush(self) -> None:
        """Make every write so far durable.

        Raises OSError when the disk fails the sync; once a failed sync covered writes
        made through this Image, every later flush (and ``close``) raises OSError (EIO)
        too: Linux may have dropped those writes, and no later sync can vouch for them.
        Close the image and check what was written since the last successful flush."""
        with self._lock:
            if not self.readonly:
                self._top.flush()

    def map(self) -> List[Extent]:
        """Allocation map of the whole disk, extent for extent as ``qemu-img map``."""
        out: List[Extent] = []
        pos, size = 0, self.size
        with self._lock:
            while pos < size:
                depth, kind, run, host = self.chain_obj.find(pos, size - pos)
                present = kind != UNALLOC
                data = kind in (DATA, COMPRESSED)
                zero = kind in (ZERO, UNALLOC)
                off = host if kind == DATA or (kind == ZERO and host) else None
                if kind == ZERO and self._drivers[depth].format == "raw":
                    off = pos   # a raw hole is the file's own bytes: qemu-img map names them
                if kind == UNALLOC and pos < self._drivers[depth].size:
                    # qemu-img map shows where the bottom image keeps space for a range
                    # that reads through (allocated but unused subclusters)
                    k2, r2, h2 = self._drivers[depth].block_status(pos, run)
                    if k2 == UNALLOC and h2:
                        off, run = h2, min(run, r2)
                e = Extent(pos, run, depth, data, zero, present, off)
                if out:
                    p = out[-1]
                    if (p.depth, p.data, p.zero, p.present) == (depth, data, zero, present) and \
                            ((p.offset is None and off is None) or
                             (p.offset is not None and off is not None and p.offset + p.length == off)):
                        out[-1] = p._replace(length=p.length + run)
                        pos += run
                        continue
                out.append(e)
                pos += run
        return out

    # ---- pulling ----------------------------------------------------------------

    def pull(self, base: Optional[str] = None, bandwidth: Union[int, str] = 0,
             on_error: str = "report", on_event: Optional[Callable[[Any], None]] = None,
             *, chunk: Optional[int] = None, batch: Optional[int] = None,
             budget: "Optional[Budget]" = None,
             read_depth: Optional[int] = None) -> "PullJob":
        """Start pulling the backing chain (down to ``base``) into this image in the
        background; returns the running ``PullJob``. ``bandwidth`` (bytes/s) is the job's
        own limit; ``budget`` (a ``blockpull.Budget``) a bandwidth shared with every job
        started with it. ``chunk`` and ``batch`` (bytes) tune how much is copied per step
        and between metadata syncs, ``read_depth`` how many chunk reads of the backing
        chain are in flight at once (default 4: more for a backing on a slow or networked
        path). Raises what ``PullJob.create`` raises, and OSError if
        the chain's tables cannot be read."""
        self._top  # closed check
        job = PullJob.create(self, base=base, bandwidth=bandwidth, on_error=on_error,
                             on_event=on_event, chunk=chunk, batch=batch, budget=budget,
                             read_depth=read_depth)
        prev, self._job = self._job, job
        try:
            job.start()
        except BaseException:
            # a job that never started must not be waited for (close aborts it)
            self._job = prev
            raise
        return job

    def base_depth(self, base: Optional[str]) -> int:
        """Chain index of ``base``; the chain length for None.

        ``base`` is any path to an image of the backing chain (through symlinks, with
        ".." or not: the file is identified by device and inode), or the name the chain
        records for it. Raises BackingChainError when it is neither, or when the name
        the chain records and the file it reaches from here are two different images.
        """
        if base is None:
            return len(self._drivers)
        base = os.fspath(base)
        named = None
        for i, d in enumerate(self._drivers[1:], 1):
            recorded = self._drivers[i - 1].backing_name
            if base == d.file.path or (recorded is not None and
                                       base in (recorded, _local_name(recorded))):
                named = i
                break
        try:
            st = os.stat(base)
        except OSError:
            st = None
        if st is None:
            if named is not None:
                return named
            raise BackingChainError(f"{self.path}: base {base!r} is not an image of its "
                                    f"backing chain (no such file, and no image of the "
                                    f"chain has that name)")
        for i, d in enumerate(self._drivers[1:], 1):
            if d.file.identity() == _identity(st):
                if named is not None and named != i:
                    break
                return i
        else:
            if named is None:
                raise BackingChainError(f"{self.path}: base {base!r} is not an image of its "
                                        f"backing chain")
        raise BackingChainError(
            f"{self.path}: base {base!r} is ambiguous: the chain names "
            f"{self._drivers[named].file.path} so, but from here it is another file; "
            f"give the base as an absolute path")

    def backing_name_for(self, base_depth: int) -> str:
        """The backing name that points the top at the image at ``base_depth``, spelt as
        the chain spells it: each relative name joined to the directory of the name
        before it, so the result is relative to the top's directory unless a link on the
        way is absolute. ".." is never collapsed as text. Checked by device and inode
        against the open base; if the composed name reaches another file, the path the
        base was opened by is used. Raises BackingChainError if neither reaches it."""
        base = self._drivers[base_depth]
        want = base.file.identity()
        top_dir = os.path.dirname(self._drivers[0].file.path)
        cur: Optional[str] = None
        for d in self._drivers[:base_depth]:
            name = d.backing_name
            name = None if name is None else _local_name(name)
            if name is None:
                cur = None
                break
            cur = name if cur is None or os.path.isabs(name) else \
                os.path.join(os.path.dirname(cur), name)
        for cand in ([_tidy(cur)] if cur else []) + [base.file.path]:
            try:
                st = os.stat(os.path.join(top_dir, cand))
            except OSError:
                continue
            if _identity(st) == want:
                return cand
        raise BackingChainError(f"{self.path}: the base {base.file.path} was moved or "
                                f"replaced during the pull; the backing link is unchanged")

    def drop_backings(self, base_depth: int) -> None:
        """Drop the images between the top and chain index ``base_depth`` from this open
        chain and close them, once the top's backing link skips them (what a finished
        pull does, after the top's ``set_backing``); ``base_depth`` past the end drops
        every backing."""
        with self._lock:
            drivers = self._drivers
            dropped = drivers[1:base_depth]
            self._drivers = [drivers[0]] + drivers[base_depth:]
            self.chain_obj = Chain(self._drivers)
            for d in dropped:
                d.close()
            log.info("%s now %s", self.path,
                     f"backed by {self._drivers[1].file.path}" if len(self._drivers) > 1
                     else "stands alone")

    # ---- closing ----------------------------------------------------------------

    def _close_files(self) -> None:
        err = None
        for d in self._drivers:
            try:
                d.close()
            except Exception as exc:  # keep closing the rest
                err = err or exc
        if err is not None:
            raise err

    def close(self) -> None:
        """Flush and close the image (a running pull is aborted first)."""
        if self._closed:
            return
        job = self._job
        if job is not None and not job.done():
            job.abort(wait=True)
        with self._lock:
            self._closed = True
            self._close_files()

    @property
    def closed(self) -> bool:
        """True once ``close()`` has run."""
        return self._closed

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<blockpull.Image {self.path!r} {self.format} size={self.size}>"


def open(path: Union[str, os.PathLike], *, readonly: bool = False, copy_on_read: bool = False,
         backing_format: Union[None, str, Dict[str, str]] = None,
         format: Optional[str] = None) -> Image:
    """Open an image and its whole backing chain.

    ``readonly`` opens the top read-only (backing files always are). ``copy_on_read`` makes
    reads of inherited data also copy it into the top. ``backing_format`` names the format
    of backing files whose format the image does not record (a string for all of them, or
    a dict from backing name, as recorded or as any path to the same file, to format).

    A backing's format comes from the image that names it: qcow2's backing-format
    extension, QED's "backing is raw" bit, or a ``json:`` name's driver. Where QED records
    none and the caller names none, the backing's magic is read and only qcow2 or QED is
    accepted (raw is never guessed); a qcow2 image that records none needs
    ``backing_format``. Chains hold at most ``MAX_CHAIN_DEPTH`` (200) images. Raises
    BackingChainError (missing, looping, too deep, unnamed format, protocol backings),
    ImageFormatError, ImageLockedError.
    """
    return Image(os.fspath(path), readonly=readonly, copy_on_read=copy_on_read,
                 backing_format=backing_format, format=format)


def create(path: Union[str, os.PathLike], size: Union[int, str], *, fmt: str = "qcow2",
           backing: Optional[str] = None, backing_format: Optional[str] = None,
           cluster_size: int = 65536, compat: str = "1.1") -> None:
    """Create an empty image (qcow2 v3, qcow2 v2 with compat="0.10", or QED).

    ``backing`` is recorded as given (relative names resolve against the new image's
    directory; a plain-file ``json:`` name is accepted); its format is taken from
    ``backing_format``, the ``json:`` name, or the file's qcow2/QED magic, and recorded
    (QED records only "raw"; a qcow2 or QED backing of a QED image is found by its magic
    again when opened). A raw backing must be named. With a backing, ``size`` 0 means the
    backing's size. Raises FileExistsError if ``path`` exists, ImageFormatError if it is a
    block device (create makes image files only).
    """
    from blockpull.units import parse_size
    path = os.fspath(path)
    size = parse_size(size) if isinstance(size, str) else int(size)
    creatable = [name for name, (_cls, _probe, make) in DRIVERS.items() if make is not None]
    if fmt not in creatable:
        raise ImageFormatError(f"{path}: cannot create format {fmt!r} "
                               f"(this build creates {' or '.join(creatable)})")
    try:
        is_device = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        is_device = False
    if is_device:
        # not a file to remove and name again: an existing volume, maybe holding data
        raise ImageFormatError(f"{path}: is a block device; create makes image files only "
                               f"(format a device with 'qemu-img create -f {fmt} {path} "
                               f"SIZE', then pull into it)")
    if os.path.exists(path):
        raise FileExistsError(_errno.EEXIST, "image already exists", path)
    if backing is not None:
        bpath, jfmt = _backing_target(backing, path)
        if jfmt is not None and backing_format is not None and jfmt != backing_format:
            raise BackingChainError(f"{path}: backing name {backing!r} names format {jfmt!r} "
                                    f"but backing_format is {backing_format!r}")
        if not os.path.exists(bpath):
            raise BackingChainError(f"{path}: backing file {bpath} does not exist")
        if backing_format is None:
            backing_format = jfmt
        if backing_format is None:
            backing_format = _probe_path(bpath, "backing", ImageFormatError(
                f"{bpath}: not a qcow2 or QED image; if it is raw, name its format: "
                f"backing_format='raw' (-F raw on the command line)"))
        if size <= 0:
            b = Image(bpath, readonly=True, format=backing_format, _lock_files=False)
            try:
                size = b.size
            finally:
                b.close()
    if size <= 0:
        raise ValueError("size must be positive (or give a backing file)")
    if size >= 1 << 63:
        raise ValueError(f"{path}: size {size} is too large for any image format")
    DRIVERS[fmt][2](path, size, cluster_size=cluster_size, compat=compat,
                    backing=backing, backing_format=backing_format)
