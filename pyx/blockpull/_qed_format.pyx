# cython: language_level=3
"""QED's on-disk layout: the header, the tables, probing and creating an image.

QED (QEMU Enhanced Disk; QEMU's docs/interop/qed_spec.txt) keeps a 64-byte little-endian
header in the first ``header_size`` clusters (the backing file name follows it there),
one L1 table and L2 tables of ``table_size`` clusters each, and data clusters. An L2 entry
is 0 (unallocated: read the backing file), 1 (reads as zeros) or the cluster-aligned host
offset of the data. There are no refcounts.

Tables live in memory in their on-disk (little-endian) form so that they can be written
back without conversion. Every header field is checked when it is read (``read_header``);
errors are ``ImageFormatError`` naming the file and the field.
"""
from libc.stdint cimport int64_t, uint64_t

from blockpull._fileio cimport File
import os
import struct

from blockpull.errors import ImageFormatError

MAGIC = b"QED\0"
#: bytes of the fixed header
HEADER_BYTES = 64
#: features: the image has a backing file
F_BACKING_FILE = 0x01
#: features: QEMU may have left the tables inconsistent; check (and repair) before writing
F_NEED_CHECK = 0x02
#: features: the backing file is raw (do not probe it)
F_BACKING_RAW = 0x04
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_RAW

MIN_CLUSTER_SIZE = 4096
MAX_CLUSTER_SIZE = 64 * 1024 * 1024
DEFAULT_TABLE_SIZE = 4
MAX_TABLE_SIZE = 16

cdef int64_t MAX_VIRTUAL_SIZE = 1LL << 61


cdef class Table(CachedTable):
    """One L1 or L2 table of ``nbytes`` bytes at file offset ``offset``, kept in on-disk
    byte order (little-endian), with the byte range changed since it was last written
    (``new``: never written at all); the buffer is ``CachedTable``'s, so QED's L2 tables
    live in the one ``TableCache``."""

    def __cinit__(self, int64_t offset, Py_ssize_t nbytes):
        self.dlo = nbytes
        self.dhi = 0

    cdef bint is_dirty(self) noexcept:
        return self.dhi > self.dlo

    cdef int load(self, File f) except -1:
        """Read the table from the file (bytes past its end read as zeros)."""
        f.read_full(self.buf, self.nbytes, self.offset)
        return 0

    cdef int write_dirty(self, File f) except -1:
        """Write the changed entries, widened to whole 512-byte sectors."""
        cdef Py_ssize_t lo, hi
        if self.dhi <= self.dlo:
            return 0
        lo = self.dlo & ~511
        hi = min((self.dhi + 511) & ~511, self.nbytes)
        f.write_full(self.buf + lo, hi - lo, self.offset + lo)
        self.clean()
        return 0


def format_error(path, msg):
    """An ImageFormatError "PATH: MSG"."""
    return ImageFormatError("%s: %s" % (path, msg))


def max_image_size(cluster_size, table_size):
    """The largest virtual size, in bytes, that QED tables of this geometry (cluster
    size in bytes, table size in clusters) can address."""
    entries = table_size * cluster_size // 8
    return min(cluster_size * entries * entries, MAX_VIRTUAL_SIZE)


def backing_name_slot(path, bytes bname, uint64_t features, int64_t old_offset,
                      int64_t old_size, int64_t header_end):
    """The header offset, in bytes, where the backing name ``bname`` is written when the
    link changes: right after the fixed header unless that overlaps the name in use
    (``old_offset``, ``old_size``, when ``features`` has F_BACKING_FILE), so that a crash
    leaves either link readable. Raises ValueError for a name that is empty, over 1023
    bytes, holds NUL or does not fit in the header."""
    cdef int64_t ln = len(bname)
    cdef int64_t old_lo = 0, old_hi = 0, pos = HEADER_BYTES
    if ln == 0 or ln > MAX_NAME or b"\0" in bname:
        raise ValueError("backing name must be 1..%d bytes without NUL" % MAX_NAME)
    if features & F_BACKING_FILE:
        old_lo, old_hi = old_offset, old_offset + old_size
    if old_hi > old_lo and pos < old_hi and pos + ln > old_lo:
        pos = (old_hi + 7) & ~7
        if pos + ln > header_end:
            raise ValueError("%s: no room for a %d-byte backing name in the header"
                             % (path, ln))
    return pos


def link_sector(sector0, uint64_t features, int64_t offset, int64_t size):
    """The header's first 512-byte sector ``sector0`` with ``features`` and the backing
    name's ``offset`` and ``size`` (bytes) replaced (QEMU's QED spec, "Header"): one
    sector write switches the backing link."""
    out = bytearray(sector0)
    struct.pack_into("<Q", out, 16, features)
    struct.pack_into("<II", out, 56, offset, size)
    return out


cdef class QedHeader:
    """A QED header as read and validated by ``read_header``: sizes in bytes except
    ``table_size`` and ``header_size`` (clusters); ``backing_name`` is None without a
    backing file."""


cpdef QedHeader read_header(File f):
    """Read and validate the QED header of ``f`` (QEMU's QED spec, "Header"): magic,
    cluster and table sizes, features, header size, L1 offset, image size and the backing
    name. Raises ImageFormatError naming the field that is wrong."""
    cdef QedHeader h = QedHeader.__new__(QedHeader)
    path = f.path
    fsize = f.size()
    if fsize < HEADER_BYTES:
        raise format_error(path, "file is too short for a QED header (%d bytes)" % fsize)
    hdr = f.pread(0, HEADER_BYTES)
    if hdr[:4] != MAGIC:
        raise format_error(path, "not a QED image (bad magic)")
    (cs, tsize, hsize, features, compat, autoclear, l1_off, isize, bfo,
     bfs) = struct.unpack("<IIIQQQQQII", hdr[4:64])
    h.file_size = fsize
    if cs < MIN_CLUSTER_SIZE or cs > MAX_CLUSTER_SIZE or cs & (cs - 1):
        raise format_error(path, "cluster_size %d invalid: QED needs a power of two from "
                       "4 KiB to 64 MiB" % cs)
    h.cluster_size = cs
    h.cluster_bits = cs.bit_length() - 1
    if tsize < 1 or tsize > MAX_TABLE_SIZE or tsize & (tsize - 1):
        raise format_error(path, "table_size %d invalid: QED needs a power of two from 1 "
                       "to 16 clusters" % tsize)
    if tsize * cs > MAX_TABLE_BYTES:
        raise format_error(path, "table_size %d with cluster_size %d makes %d-byte tables; "
                       "at most %d are supported (convert the image with smaller "
                       "clusters)" % (tsize, cs, tsize * cs, MAX_TABLE_BYTES))
    h.table_size = tsize
    h.table_bytes = tsize * cs
    unknown = features & ~KNOWN_FEATURES
    if unknown:
        raise format_error(path, "unknown bits 0x%x in the features field; this image needs "
                       "a newer tool" % unknown)
    h.features = features
    h.compat_features = compat       # none defined; unknown ones may be ignored
    h.autoclear_features = autoclear
    if hsize < 1 or hsize * cs > fsize:
        raise format_error(path, "header_size %d clusters invalid (1 up to the file size)" % hsize)
    h.header_size = hsize
    h.header_end = hsize * cs
    if l1_off % cs or l1_off < h.header_end:
        raise format_error(path, "l1_table_offset 0x%x invalid: must be cluster aligned and "
                       "after the header" % l1_off)
    if l1_off + (tsize - 1) * cs >= fsize:
        raise format_error(path, "l1_table_offset 0x%x: the L1 table lies past the end of "
                       "the file" % l1_off)
    h.l1_offset = l1_off
    if isize % 512:
        raise format_error(path, "image_size %d is not a multiple of 512" % isize)
    if isize > max_image_size(cs, tsize):
        raise format_error(path, "image_size %d is more than cluster_size %d and table_size %d "
                       "can address" % (isize, cs, tsize))
    h.size = isize
    entries = tsize * cs // 8
    h.l2_entries = entries
    h.l2_bits = entries.bit_length() - 1
    h.backing_name = None
    h.backing_offset = bfo
    h.backing_size = bfs
    if features & F_BACKING_FILE:
        if bfs == 0 or bfs > MAX_NAME:
            raise format_error(path, "backing_filename_size %d invalid (1..%d)" % (bfs, MAX_NAME))
        if bfo < HEADER_BYTES or bfo + bfs > h.header_end:
            raise format_error(path, "backing_filename_offset %d (size %d) lies outside the "
                           "header (%d bytes)" % (bfo, bfs, h.header_end))
        raw = f.pread(bfo, bfs)
        if b"\0" in raw:
            raise format_error(path, "backing file name contains a NUL byte")
        h.backing_name = raw.decode("utf-8", "surrogateescape")
    return h


def probe(bytes head):
    """True if ``head`` (the file's first bytes) starts like a QED image."""
    return head[:4] == MAGIC


def create(path, int64_t size, int64_t cluster_size=65536, compat=None, backing=None,
           backing_format=None, int table_size=DEFAULT_TABLE_SIZE):
    """Write a new, empty QED image as ``qemu-img create -f qed`` lays it out: a one-cluster
    header with the backing name after it, then an empty L1 table.

    ``compat`` exists for a uniform signature: QED has no compatibility levels, so only
    None or the default "1.1" are accepted. Of ``backing_format`` QED records only "raw"
    (the 0x04 feature bit); with the bit clear, openers probe the backing's magic (QEMU's
    QED spec, "backing file format"), which finds a qcow2 or QED backing again.
    ``table_size`` (clusters per table) is 2..16: QEMU cannot open images with 1.
    """
    if cluster_size < MIN_CLUSTER_SIZE or cluster_size > MAX_CLUSTER_SIZE or \
            cluster_size & (cluster_size - 1):
        raise ValueError("QED cluster_size must be a power of two from 4K to 64M")
    if table_size < 2 or table_size > MAX_TABLE_SIZE or table_size & (table_size - 1):
        # the format allows 1, but QEMU refuses to open such images ("QED table offset
        # is invalid"), so none is made here
        raise ValueError("QED table_size must be a power of two from 2 to 16")
    if table_size * cluster_size > MAX_TABLE_BYTES:
        raise ValueError("QED tables of %d bytes are too large" % (table_size * cluster_size))
    if compat not in (None, "1.1"):
        raise ValueError("QED has no compat levels (compat=%r is for qcow2)" % (compat,))
    if size < 0:
        raise ValueError("size must not be negative")
    size = (size + 511) & ~511
    if size > max_image_size(cluster_size, table_size):
        raise ValueError("size %d is too large for cluster_size %d" % (size, cluster_size))
    features = 0
    name_off = 0
    bname = b""
    if backing is not None:
        bname = os.fsencode(backing)
        if not bname or len(bname) > MAX_NAME or b"\0" in bname:
            raise ValueError("backing name must be 1..%d bytes without NUL" % MAX_NAME)
        features |= F_BACKING_FILE
        if backing_format == "raw":
            features |= F_BACKING_RAW
        name_off = HEADER_BYTES
    hdr = bytearray(cluster_size)
    struct.pack_into("<4sIIIQQQQQII", hdr, 0, MAGIC, cluster_size, table_size, 1, features,
                     0, 0, cluster_size, size, name_off, len(bname))
    hdr[HEADER_BYTES:HEADER_BYTES + len(bname)] = bname
    f = File(path, True, "top", True)
    try:
        f.pwrite(hdr, 0)
        f.truncate(cluster_size + table_size * cluster_size)
        f.fdatasync()
    finally:
        f.close()
