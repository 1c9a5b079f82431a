# cython: language_level=3
"""qcow2 extended L2 entries: writes, links and pull status per subcluster (_q2sub.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._tablecache cimport Table
from blockpull._q2order cimport Qcow2Ordering

# the subcluster bitmap of an extended L2 entry (QEMU's docs/interop/qcow2.rst,
# "Extended L2 Entries"): bit x allocated, bit 32 + x reads as zeros
cdef extern from *:
    const uint64_t SUB_ALLOC_ALL "0x00000000FFFFFFFFULL"
    const uint64_t SUB_ZERO_ALL "0xFFFFFFFF00000000ULL"


cdef inline uint64_t sub_mask(int a, int b) noexcept nogil:
    """Bits a .. b-1 (0 <= a <= b <= 32)."""
    return ((1ULL << b) - 1) & ~((1ULL << a) - 1)


cdef inline int mask_run(uint64_t mask, int s, int* t) noexcept nogil:
    """The next run of subclusters set in ``mask`` at or after subcluster ``s``: its
    first (returned; 32 when there is none) and, in ``t``, the one after its last."""
    while s < 32 and not (mask >> s) & 1:
        s += 1
    t[0] = s
    while t[0] < 32 and (mask >> t[0]) & 1:
        t[0] += 1
    return s


cdef class Qcow2Sub(Qcow2Ordering):
    # primitives of the write path, given by blockpull._qcow2.Qcow2
    cdef Table _l2_for_write(self, int64_t l1i)
    cdef int _bound_dirty(self) except -1
    cdef _bitmaps_mark(self, int64_t vaddr, int64_t n)

    cdef _unlink_fresh(self, int64_t c, int64_t host, object old)
    cdef int ext_get(self, int64_t c, uint64_t* e, uint64_t* bm) except -1
    cdef int ext_put(self, int64_t c, uint64_t e, uint64_t bm) except -1
    cdef int ext_replace(self, int64_t c, uint64_t e, uint64_t bm) except -1
    cdef int ext_sub_content(self, int64_t c, int sub, uint64_t e, uint64_t bm,
                             bytearray buf, int64_t at, object fill) except -1
    cdef int ext_write(self, int64_t vaddr, const unsigned char* src, int64_t n,
                       object fill) except -1
    cdef int64_t ext_fresh_run(self, int64_t c, int64_t most) except -1
    cdef int ext_write_run(self, int64_t c, const unsigned char* src, int64_t k) except -1
    cdef int ext_write_cluster(self, int64_t c, int64_t coff, const unsigned char* src,
                               int64_t n, object fill) except -1
    cdef bytearray ext_span_buffer(self, int64_t c, int s0, int s1, int64_t coff,
                                   const unsigned char* src, int64_t n, uint64_t e,
                                   uint64_t bm, object fill)
    cdef int ext_new_cluster(self, int64_t c, const unsigned char* p, int64_t at,
                             int64_t n, uint64_t e, uint64_t bm, uint64_t newbm) except -1
    cdef int ext_rewrite_compressed(self, int64_t c, int64_t coff,
                                    const unsigned char* src, int64_t n,
                                    uint64_t e, uint64_t bm) except -1
    cdef int ext_copy_subs(self, uint64_t mask, int64_t src_host, int64_t dst_host) except -1
    cdef bint ext_link(self, int64_t vaddr, int64_t host) except -1
    cdef bint ext_link_zero(self, int64_t vaddr) except -1
    cdef tuple ext_pull_status(self, int64_t vaddr, int64_t n)
    cdef bint ext_lacks(self, int64_t c) except -1
    cdef bint ext_link_views(self, int64_t c, int64_t host) except -1
    cdef int ext_move_active(self, int64_t c, list tables, list todo, dict targets) except -1
    cdef bint ext_put_views(self, int64_t c, list todo, dict targets) except -1
    cdef int ext_unlink_views(self, int64_t c, list undo) except -1
    cdef bint ext_link_zero_views(self, int64_t c) except -1
