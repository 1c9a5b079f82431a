# cython: language_level=3
"""qcow2 refcounts: the refcount table, its blocks, and cluster allocation
(_q2refcount.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._fileio cimport File
from blockpull._tablecache cimport Table, TableCache


cdef inline uint64_t rc_load(const unsigned char* b, int order, int64_t i) noexcept nogil:
    """Refcount ``i`` of a refcount block: 2**order bits, big-endian, packed from the
    least significant bit of each byte for orders below 3 (QEMU's docs/interop/qcow2.rst,
    "Host cluster management")."""
    cdef int bits = 1 << order
    cdef int k
    cdef uint64_t v = 0
    if order == 4:
        return (<uint64_t>b[2 * i] << 8) | b[2 * i + 1]
    if order >= 3:
        for k in range(bits >> 3):
            v = (v << 8) | b[i * (bits >> 3) + k]
        return v
    return (b[(i * bits) >> 3] >> ((i * bits) & 7)) & ((1 << bits) - 1)


cdef inline void rc_store(unsigned char* b, int order, int64_t i, uint64_t v) noexcept nogil:
    """Store refcount ``i`` of a refcount block (layout as ``rc_load``)."""
    cdef int bits = 1 << order
    cdef int k, nb
    cdef int64_t byte, shift
    cdef unsigned char mask
    if order >= 3:
        nb = bits >> 3
        for k in range(nb - 1, -1, -1):
            b[i * nb + k] = v & 0xFF
            v >>= 8
    else:
        byte = (i * bits) >> 3
        shift = (i * bits) & 7
        mask = ((1 << bits) - 1) << shift
        b[byte] = (b[byte] & ~mask) | ((v << shift) & mask)


cdef class Refcounts:
    cdef File file
    cdef int cluster_bits
    cdef int64_t cluster_size
    cdef readonly int refcount_order
    cdef int rb_bits
    cdef int64_t rb_entries
    cdef uint64_t rc_max
    cdef Table table              # the refcount table
    cdef TableCache cache         # refcount blocks by table index
    cdef set dirty_entries        # table indexes that point at new blocks
    cdef bint moved               # a grown table, written and switched to at the next flush
    cdef tuple old_table          # (offset, clusters) of the table it replaces
    cdef readonly int64_t next_free
    cdef public int64_t file_size
    cdef list wrote               # (index, block) written since the last good sync

    cdef Table block(self, int64_t idx)
    cdef uint64_t get(self, int64_t cluster) except? 0xFFFFFFFFFFFFFFFF
    cdef int add(self, int64_t cluster, int delta) except -1
    cdef int64_t alloc(self, int64_t n) except -1
    cdef int64_t reserve(self, int64_t n) except -1
    cdef int claim(self, int64_t c, int64_t n) except -1
    cdef int free_now(self, int64_t c, int64_t n) except -1
    cdef int trim_tail(self) except -1
    cdef int64_t counted_end(self) except -1
    cdef int write_blocks(self) except -1
    cdef int write_grown(self) except -1
    cdef set write_entries(self)
    cdef int _ensure_table(self, int64_t idx) except -1
    cdef int _count_new(self, int64_t c) except -1
    cdef int _new_block(self, int64_t idx) except -1
    cdef int64_t _find_free(self, int64_t n) except -1

    cdef inline uint64_t host_end(self) noexcept:
        """End of the host space a table may point into: the file, plus what has been
        allocated since it was opened."""
        return max(self.file_size, self.next_free << self.cluster_bits)
