"""Opening and creating images, and the ``Image`` object people read, write and pull."""
from __future__ import annotations

import errno as _errno
import logging
import os
import stat
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from blockpull._chain import Chain
from blockpull._inflight import copy_on_read
from blockpull.blockmap import Extent, chain_map
from blockpull.errors import BackingChainError, ImageFormatError, ImageNotFoundError
from blockpull.datafile import attach_data_file
from blockpull.formats import FORMATS, creatable, open_driver, probe_path
from blockpull.job import PullJob
from blockpull.locking import lock_image
from blockpull.repair import repair_on_open
from blockpull.paths import backing_target, identity, kernel_abspath, local_name, tidy

if TYPE_CHECKING:  # pragma: no cover
    from blockpull._driver import Driver
    from blockpull._stream import Stream
    from blockpull.budget import Budget

log = logging.getLogger("blockpull")

__all__ = ["create", "open", "Image", "ChainEntry", "Extent", "MAX_CHAIN_DEPTH"]

#: the most images a chain may hold, the top included (libvirt's cap; QEMU has none)
MAX_CHAIN_DEPTH = 200


class ChainEntry(NamedTuple):
    """One image of a backing chain."""
    path: str
    format: str
    size: int


class Image:
    """An open image and its backing chain. Use ``blockpull.open`` to get one.

    Reads go through the whole chain; writes go to the top image with copy-on-write of
    partial clusters. All methods are thread-safe: a lock serialises metadata changes,
    so reads and writes may run from other threads while a pull runs.
    """

    def __init__(self, path: str, *, readonly: bool = False, copy_on_read: bool = False,
                 backing_format: Union[None, str, Dict[str, str]] = None,
                 format: Optional[str] = None, force_share: bool = False,
                 allow_data_file: bool = False) -> None:
        if force_share and not readonly:
            raise ValueError("force_share opens without QEMU's locks, which only a read-only "
                             "open may do: pass readonly=True")
        self.path = kernel_abspath(os.fspath(path))
        self.readonly = readonly
        self.copy_on_read = copy_on_read and not readonly
        self._lock = threading.RLock()
        self._job: Optional["PullJob"] = None
        self._closed = False
        self._drivers: list = []
        self._backing_format = backing_format
        self._allow_data_file = allow_data_file
        try:
            self._open_chain(format, not force_share)
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
            if identity(st) == identity(want):
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
        bpath, jfmt = backing_target(name, cur_path)
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
        if bfmt is not None and bfmt not in FORMATS:
            raise BackingChainError(f"{cur_path}: backing format {bfmt!r} is not supported")
        return bpath, bfmt

    def _open_chain(self, fmt: Optional[str], lock_files: bool) -> None:
        if not os.path.exists(self.path):
            raise ImageNotFoundError(f"{self.path}: no such image file")
        if not self.readonly:
            # what QEMU repairs on a read-write open is repaired first, under the lock
            repair_on_open(self.path, fmt)
        top = open_driver(self.path, fmt, not self.readonly, "top")
        self._drivers.append(top)
        if lock_files:
            lock_image(top.file, not self.readonly, self.path)
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
                drv = open_driver(bpath, bfmt, False, "backing", unprobed)
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
                lock_image(drv.file, False, bpath)
            cur, cur_path = drv, bpath
        # data files last: none may be an image of the chain (or another's data file)
        for i, drv in enumerate(self._drivers):
            attach_data_file(drv, drv.file.path, "backing" if i else "top",
                             self._allow_data_file, lock_files, seen)

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
        """Allocation map of the whole disk, extent for extent as ``qemu-img map``
        (blockpull.blockmap). Raises OSError if a table or a host file cannot be read."""
        with self._lock:
            return chain_map(self.chain_obj, self._drivers, self.size)

    # ---- pulling ----------------------------------------------------------------

    def pull(self, base: Optional[str] = None, bandwidth: Union[int, str] = 0,
             on_error: str = "report", on_event: Optional[Callable[[Any], None]] = None,
             *, chunk: Optional[int] = None, batch: Optional[int] = None,
             budget: "Optional[Budget]" = None,
             read_depth: Optional[int] = None,
             compressed: str = "inflate") -> "PullJob":
        """Start pulling the backing chain (down to ``base``) into this image in the
        background; returns the running ``PullJob``. ``bandwidth`` (bytes/s) is the job's
        own limit; ``budget`` (a ``blockpull.Budget``) a bandwidth shared with every job
        started with it. ``chunk`` and ``batch`` (bytes) tune how much is copied per step
        and between metadata syncs, ``read_depth`` how many chunk reads of the backing
        chain are in flight at once (default 4: more for a backing on a slow or networked
        path). ``compressed="keep"`` copies the backing's compressed clusters into a
        qcow2 top as they are where the formats allow ("inflate", the default, writes
        them as plain data; see ``PullJob.create``). Raises what ``PullJob.create``
        raises, and OSError if
        the chain's tables cannot be read."""
        self._top  # closed check
        job = PullJob.create(self, base=base, bandwidth=bandwidth, on_error=on_error,
                             on_event=on_event, chunk=chunk, batch=batch, budget=budget,
                             read_depth=read_depth, compressed=compressed)
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
                                       base in (recorded, local_name(recorded))):
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
            if d.file.identity() == identity(st):
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
            name = None if name is None else local_name(name)
            if name is None:
                cur = None
                break
            cur = name if cur is None or os.path.isabs(name) else \
                os.path.join(os.path.dirname(cur), name)
        for cand in ([tidy(cur)] if cur else []) + [base.file.path]:
            try:
                st = os.stat(os.path.join(top_dir, cand))
            except OSError:
                continue
            if identity(st) == want:
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
         format: Optional[str] = None, force_share: bool = False,
         allow_data_file: bool = False) -> Image:
    """Open an image and its whole backing chain.

    ``readonly`` opens the top read-only (backing files always are). ``copy_on_read`` makes
    reads of inherited data also copy it into the top. ``backing_format`` names the format
    of backing files whose format the image does not record (a string for all of them, or
    a dict from backing name, as recorded or as any path to the same file, to format).
    ``force_share`` (read-only opens only, like ``qemu-img -U``) takes none of QEMU's
    lock bytes, so an image another process writes can be inspected; what it reads may
    then be inconsistent.

    A qcow2 image with an external data file (QEMU's docs/interop/qcow2.rst, "Header",
    incompatible bit 2) reads and writes its data clusters there, at their guest
    offsets; a relative name is taken from the image's directory, and the data file is
    locked as the image is. A data file named by a *backing* image is followed only with
    ``allow_data_file=True`` (QEMU's rule since CVE-2024-32498: a backing's header could
    make the reader open any file); without it the open raises DataFileNotAllowedError.

    A backing's format comes from the image that names it: qcow2's backing-format
    extension, QED's "backing is raw" bit, or a ``json:`` name's driver. Where QED records
    none and the caller names none, the backing's magic is read and only qcow2 or QED is
    accepted (raw is never guessed); a qcow2 image that records none needs
    ``backing_format``. Chains hold at most ``MAX_CHAIN_DEPTH`` (200) images. Raises
    BackingChainError (missing, looping, too deep, unnamed format, protocol backings),
    ImageFormatError (DataFileNotAllowedError included), ImageLockedError, ValueError
    (``force_share`` without ``readonly``).
    """
    return Image(os.fspath(path), readonly=readonly, copy_on_read=copy_on_read,
                 backing_format=backing_format, format=format, force_share=force_share,
                 allow_data_file=allow_data_file)


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
    makes = creatable()
    if fmt not in makes:
        raise ImageFormatError(f"{path}: cannot create format {fmt!r} "
                               f"(this build creates {' or '.join(makes)})")
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
        bpath, jfmt = backing_target(backing, path)
        if jfmt is not None and backing_format is not None and jfmt != backing_format:
            raise BackingChainError(f"{path}: backing name {backing!r} names format {jfmt!r} "
                                    f"but backing_format is {backing_format!r}")
        if not os.path.exists(bpath):
            raise BackingChainError(f"{path}: backing file {bpath} does not exist")
        if backing_format is None:
            backing_format = jfmt
        if backing_format is None:
            backing_format = probe_path(bpath, "backing", ImageFormatError(
                f"{bpath}: not a qcow2 or QED image; if it is raw, name its format: "
                f"backing_format='raw' (-F raw on the command line)"))
        if size <= 0:
            b = Image(bpath, readonly=True, format=backing_format, force_share=True)
            try:
                size = b.size
            finally:
                b.close()
    if size <= 0:
        raise ValueError("size must be positive (or give a backing file)")
    if size >= 1 << 63:
        raise ValueError(f"{path}: size {size} is too large for any image format")
    make = FORMATS[fmt].create
    assert make is not None         # fmt is one of creatable()
    make(path, size, cluster_size=cluster_size, compat=compat, backing=backing,
         backing_format=backing_format)
