"""The allocation map of a backing chain, extent for extent as ``qemu-img map`` gives it.

The chain (blockpull._chain) says which image provides each range and how (data, zeros,
unallocated). For the map, two more facts come from the host file, as QEMU's block
layer takes them:

- a qcow2 image that looks preallocated with ``preallocation=metadata`` (more clusters
  referenced than the host file allocates, see ``metadata_preallocated``) has its data
  clusters looked up in the host file too: a hole there reads as zeros, and the map says
  ``"zero": true`` for it (QEMU's block/qcow2.c qcow2_co_block_status, BDRV_BLOCK_RECURSE);
- a raw image is as long as its file rounded up to 512 bytes (blockpull._raw).

A pull never uses these: it copies what an image allocates, holes or not.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from blockpull._driver import COMPRESSED, DATA, UNALLOC, ZERO
from blockpull._qcow2 import INCOMPAT_DATA_FILE
from blockpull.errors import ImageFormatError

if TYPE_CHECKING:  # pragma: no cover
    from blockpull._chain import Chain
    from blockpull._driver import Driver

__all__ = ["Extent", "chain_map", "metadata_preallocated", "SECTOR", "PROBE_LIMIT"]

#: the unit QEMU measures an image file's length in (bytes): a file's length is rounded up
SECTOR = 512
#: the longest range ``qemu-img map`` asks about at once (bytes); extents end at its edges
#: when a host file's end falls inside one
PROBE_LIMIT = 1 << 30


class Extent(NamedTuple):
    """A run of the virtual disk that reads the same way (``qemu-img map`` semantics).

    ``start`` and ``length`` in bytes; ``depth`` is the chain index that provides it,
    ``present`` whether any image of the chain allocates it, ``offset`` the host offset
    (bytes) in that image where it has one.
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


def _file_length(drv: "Driver") -> int:
    """The length QEMU gives the host file of ``drv`` (bytes, rounded up to 512)."""
    n = drv.file.size()
    return -(-n // SECTOR) * SECTOR


def metadata_preallocated(drv: "Driver") -> bool:
    """Whether QEMU takes the qcow2 image ``drv`` for one made with
    ``preallocation=metadata``, and so asks its host file where data clusters have holes.

    QEMU's rule (block/qcow2-refcount.c, qcow2_detect_metadata_preallocation): with R
    the bytes the host file allocates (st_blocks * 512) in clusters, the image is taken
    as preallocated when at least max(R * 10 / 9, R + 2) of the clusters of the host
    file have a non-zero refcount. False for other formats and for images with an
    external data file (not asked here), and (as in QEMU) when a refcount cannot be
    read: the map does not need them."""
    if drv.format != "qcow2":
        return False
    if drv.incompatible & INCOMPAT_DATA_FILE:   # type: ignore[attr-defined]
        # QEMU asks the external data file then; its host offsets are not drv.file's
        return False
    cs = drv.cluster_size
    real = os.fstat(drv.file.fd).st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    end = -(-_file_length(drv) // cs)
    if end < threshold:
        return False          # even every cluster referenced would not reach it
    refcount = drv.refcount   # type: ignore[attr-defined]
    count = 0
    try:
        for c in range(end):
            if refcount(c):
                count += 1
                if count >= threshold:
                    return True
    except (OSError, ImageFormatError):
        pass
    return False


def _host_zero(drv: "Driver", host: int, run: int) -> Tuple[bool, int]:
    """(zero, length): what the host file of ``drv`` holds at [host, host+run) for a
    data run of its format, as QEMU's block/io.c bdrv_co_block_status merges it: the run
    is cut where the file turns from data to hole or back, and a hole reads as zeros; a
    hole that reaches the end of the file (or a run past it) makes the whole run zero."""
    end = _file_length(drv)
    if host >= end:
        return True, run
    n = min(run, end - host)
    try:
        found = drv.file.next_data(host)
    except OSError:
        return False, run   # QEMU learns nothing then, and keeps the run as data
    if found is None:
        return True, (run if host + n == end else n)
    data, hole = found
    if data > host:
        return True, min(n, data - host)
    return False, min(n, hole - host)


def _has_offset(drv: "Driver", pos: int, host: int) -> bool:
    """Whether the unit at ``pos`` that block status placed at ``host`` (0: none) has a
    host offset to report: any non-zero one, and 0 itself where an external data file
    holds guest cluster 0 (its entry names offset 0 with COPIED set; QEMU's
    docs/interop/qcow2.rst, "Header", incompatible bit 2)."""
    if host:
        return True
    if not drv.external_data or pos >= drv.cluster_size:
        return False
    return bool(drv.data_offset_named(pos))  # type: ignore[attr-defined]


def _extent(pos: int, found: Tuple[int, int, int, int], drivers: Sequence["Driver"],
            recurse: List[Optional[bool]]) -> Extent:
    """The extent at ``pos`` from what ``Chain.find`` found there."""
    depth, kind, run, host = found
    drv = drivers[depth]
    present = kind != UNALLOC
    data = kind in (DATA, COMPRESSED)
    zero = kind in (ZERO, UNALLOC)
    off = host if kind == DATA or (kind == ZERO and _has_offset(drv, pos, host)) else None
    if kind == ZERO and drv.format == "raw":
        off = pos   # a raw hole is the file's own bytes: qemu-img map names them
    if kind == UNALLOC and pos < drv.size:
        # qemu-img map shows where the bottom image keeps space for a range
        # that reads through (allocated but unused subclusters)
        k2, r2, h2 = drv.block_status(pos, run)
        if k2 == UNALLOC and _has_offset(drv, pos, h2):
            off, run = h2, min(run, r2)
    if kind == DATA and drv.format != "raw":
        if recurse[depth] is None:
            recurse[depth] = metadata_preallocated(drv)
        if recurse[depth]:
            zero, run = _host_zero(drv, host, run)
    return Extent(pos, run, depth, data, zero, present, off)


def chain_map(chain: "Chain", drivers: Sequence["Driver"], size: int) -> List[Extent]:
    """Allocation map of the first ``size`` bytes of ``chain`` (its ``drivers``, top
    first), merged as ``qemu-img map`` merges it. Raises OSError if a table or the host
    file cannot be read, ImageFormatError for a malformed table entry."""
    out: List[Extent] = []
    recurse: List[Optional[bool]] = [None] * len(drivers)
    pos = 0
    while pos < size:
        e = _extent(pos, chain.find(pos, min(size - pos, PROBE_LIMIT)), drivers, recurse)
        pos += e.length
        if out:
            p = out[-1]
            if (p.depth, p.data, p.zero, p.present) == (e.depth, e.data, e.zero, e.present) \
                    and ((p.offset is None and e.offset is None) or
                         (p.offset is not None and e.offset is not None and
                          p.offset + p.length == e.offset)):
                out[-1] = p._replace(length=p.length + e.length)
                continue
        out.append(e)
    return out
