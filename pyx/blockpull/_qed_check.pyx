# cython: language_level=3
"""The metadata check of a QED image, as QEMU's qed-check counts it.

QED has no refcounts (QEMU's docs/interop/qed_spec.txt): every cluster after the header
must be referenced exactly once, by the L1 table, an L2 table or an L2 entry. A second
reference, or an entry that is unaligned, inside the header or past the end of the file,
is a corruption; an unreferenced cluster is a leak. The header and the tables are read
with the driver's own decoding (``_qed_format.read_header``, ``Table``).
"""
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free

from blockpull._fileio cimport File
from blockpull._qed_format cimport ZERO_ENTRY, QedHeader, Table, read_header

cdef enum:
    MAX_MESSAGES = 1000         # findings listed; the rest are counted only
    WHAT_L1 = 0                 # the L1 table
    WHAT_L2 = 1                 # an L2 table (a: its L1 index)
    WHAT_DATA = 2               # a data cluster (a: its L2 table's offset, b: its index)


cdef class QedCheck:
    """What ``check_qed`` found: ``corruptions``, ``leaks``, ``allocated_clusters`` and
    ``fragmented_clusters`` (data clusters not following the one before them in the same
    L2 table, as ``qemu-img check`` counts), ``image_end_offset`` (bytes: end of the last
    cluster in use), ``total_clusters`` (of the virtual disk), ``messages`` (at most 1000
    lines)."""
    cdef readonly int64_t corruptions
    cdef readonly int64_t leaks
    cdef readonly int64_t allocated_clusters
    cdef readonly int64_t fragmented_clusters
    cdef readonly int64_t image_end_offset
    cdef readonly int64_t total_clusters
    cdef readonly list messages
    cdef unsigned char* used
    cdef int64_t nb
    cdef uint64_t cs
    cdef uint64_t header_end

    def __cinit__(self):
        self.messages = []

    def __dealloc__(self):
        free(self.used)

    cdef int _say(self, str line) except -1:
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(line)
        return 0

    cdef str _what(self, int what, uint64_t a, int64_t b):
        if what == WHAT_L1:
            return "L1 table"
        if what == WHAT_L2:
            return "L2 table (L1 entry %d)" % a
        return "data cluster (L2 0x%x entry %d)" % (a, b)

    cdef bint _mark(self, uint64_t off, int64_t n, int what, uint64_t a, int64_t b):
        """Count ``n`` clusters at ``off`` as referenced; False if the reference is
        invalid or any of them was referenced before."""
        cdef uint64_t limit = <uint64_t>self.nb * self.cs
        cdef uint64_t span = <uint64_t>n * self.cs
        cdef int64_t c
        cdef bint ok = True
        if off % self.cs or span > limit or off > limit - span or off < self.header_end:
            self.corruptions += 1
            self._say("ERROR %s offset 0x%x invalid" % (self._what(what, a, b), off))
            return False
        for c in range(<int64_t>(off // self.cs), <int64_t>(off // self.cs) + n):
            if self.used[c]:
                self.corruptions += 1
                ok = False
                self._say("ERROR cluster %d referenced twice (%s)" % (c, self._what(what, a, b)))
            self.used[c] = 1
        return ok

    cdef int _walk(self, File f, QedHeader h) except -1:
        cdef int64_t table_clusters = h.table_bytes // h.cluster_size
        cdef Table l1 = Table(h.l1_offset, h.table_bytes)
        cdef Table l2
        cdef int64_t i, j
        cdef uint64_t l2_off, e, last
        self._mark(<uint64_t>h.l1_offset, table_clusters, WHAT_L1, 0, 0)
        l1.load(f)
        for i in range(h.l2_entries):
            l2_off = l1.get(i)
            if not l2_off:
                continue
            if not self._mark(l2_off, table_clusters, WHAT_L2, i, 0):
                continue
            l2 = Table(<int64_t>l2_off, h.table_bytes)
            l2.load(f)
            last = 0
            for j in range(h.l2_entries):
                e = l2.get(j)
                if e > ZERO_ENTRY:                  # 1 is a zero cluster, 0 unallocated
                    self.allocated_clusters += 1
                    if last and e != last + self.cs:   # qemu-img's count, per L2 table
                        self.fragmented_clusters += 1
                    last = e
                    self._mark(e, 1, WHAT_DATA, l2_off, j)
        return 0

    cdef int _count_leaks(self, QedHeader h) except -1:
        cdef int64_t c
        cdef int64_t highest = h.header_size - 1
        for c in range(h.header_size, self.nb):
            if self.used[c]:
                highest = c
            else:
                self.leaks += 1
                self._say("Leaked cluster %d" % c)
        self.image_end_offset = (highest + 1) * h.cluster_size
        return 0


def check_qed(File f):
    """Check the QED image open as ``f``: returns a ``QedCheck``. Changes nothing.
    Raises ImageFormatError when the header is unusable."""
    cdef QedHeader h = read_header(f)
    cdef QedCheck chk = QedCheck()
    cdef int64_t cs = h.cluster_size
    chk.cs = cs
    chk.header_end = h.header_size * cs
    chk.nb = (f.size() + cs - 1) // cs
    chk.used = <unsigned char*>calloc(chk.nb if chk.nb > 0 else 1, 1)
    if chk.used == NULL:
        raise MemoryError()
    chk.total_clusters = (h.size + cs - 1) // cs
    chk._walk(f, h)
    chk._count_leaks(h)
    return chk


cdef bint _valid(uint64_t off, uint64_t n, uint64_t cs, uint64_t header_end,
                 uint64_t file_size) noexcept:
    """Does [off, off + n) name clusters QEMU's check accepts: aligned, after the header,
    starting inside the file (block/qed-check.c, qed_check_cluster_offset)?"""
    return (off % cs == 0 and off >= header_end and off < file_size and
            off + n - cs < file_size)


def repair_qed(File f):
    """Clear the entries QEMU's check clears when it opens an image with the need-check
    bit set read-write (block/qed-check.c with fix): an L1 entry naming an L2 table, or an
    L2 entry naming a data cluster, that is unaligned, inside the header or past the end
    of the file. Changed tables are written and made durable (fdatasync); the need-check
    bit is the caller's to clear. Returns ``(entries cleared, QedCheck of the result)``:
    the check's corruptions (clusters referenced twice) are left as they are. Raises
    ImageFormatError when the header is unusable, OSError when a write or sync fails."""
    cdef QedHeader h = read_header(f)
    cdef uint64_t cs = h.cluster_size
    cdef uint64_t header_end = h.header_size * cs
    cdef uint64_t file_size = f.size()
    cdef Table l1 = Table(h.l1_offset, h.table_bytes)
    cdef Table l2
    cdef int64_t i, j, cleared = 0
    cdef uint64_t l2_off, e
    l1.load(f)
    for i in range(h.l2_entries):
        l2_off = l1.get(i)
        if not l2_off:
            continue
        if not _valid(l2_off, h.table_bytes, cs, header_end, file_size):
            l1.put(i, 0)
            cleared += 1
            continue
        l2 = Table(<int64_t>l2_off, h.table_bytes)
        l2.load(f)
        for j in range(h.l2_entries):
            e = l2.get(j)
            if e > ZERO_ENTRY and not _valid(e, cs, cs, header_end, file_size):
                l2.put(j, 0)
                cleared += 1
        if l2.dirty():
            l2.write_dirty(f)
    if l1.dirty():
        l1.write_dirty(f)
    if cleared:
        f.fdatasync()
    return cleared, check_qed(f)
