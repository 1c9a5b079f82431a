# cython: language_level=3
"""Copies in flight between a pull's write and its link, and copy-on-read (see _inflight.pyx)."""
from libc.stdint cimport int64_t
from libc.string cimport memcmp

from blockpull._driver cimport Driver
from blockpull._fileio cimport File
from blockpull._ratelimit cimport RateLimiter


cdef inline bint all_zero(const unsigned char* p, int64_t n) noexcept nogil:
    """True when the ``n`` bytes at ``p`` are all zero."""
    if n == 0:
        return True
    if p[0] != 0 or p[n - 1] != 0:
        return False
    return memcmp(p, p + 1, n - 1) == 0


cdef class Chunk:
    cdef int64_t off
    cdef int64_t n
    cdef int64_t host
    cdef list todo
    cdef list zeros
    cdef list skips
    cdef list views
    cdef object bmv
    cdef object future
    cdef object buf
    cdef int64_t epoch
    cdef list runs
    cdef bytearray state
    cdef dict craw            # cluster index -> compressed bytes kept as they are
    cdef list ctodo           # cluster indexes linked as compressed clusters, in order
    cdef list cplaces         # host byte offset of each one's bytes in the top
    cdef int64_t cdone        # ctodo[:cdone] are linked or given back
    cdef list masks           # per todo cluster, the subclusters to write (ext L2 in a
                              # data file), or None: whole clusters
    cdef int64_t charge       # bytes drawn for it from the pull's rate limiter
    cdef int64_t charge_epochs[2]   # that limiter's and its parent's epochs then

    cdef release_views(self)
    cdef set_views(self, int64_t cs)


cdef class Flight:
    cdef object lock
    cdef object linked
    cdef int64_t cs
    cdef list copying
    cdef readonly int waiters
    cdef RateLimiter limiter

    cdef bint overlaps(self, int64_t a, int64_t b)
    cdef reserve(self, Chunk ch)
    cdef unreserve(self, Chunk ch)
    cdef clear(self)


cdef int keep_lacking(Driver top, Flight flight, Chunk ch, bint keep_base,
                      int64_t* skipped) except -1
cdef int cor_group(Driver top, list views, list vaddrs, int64_t cs) except -1
cdef bint write_zero_cluster(Driver top, int64_t v, int64_t n) except -1
cdef int host_write(File f, Chunk ch, int64_t cs) except -1
