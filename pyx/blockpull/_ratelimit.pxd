# cython: language_level=3
from libc.stdint cimport int64_t

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass

cdef class RateLimiter:
    cdef pthread_mutex_t mu
    cdef pthread_cond_t cond
    cdef int64_t _rate
    cdef double t0
    cdef int64_t sent
    cdef int64_t gen
    cdef int64_t epoch
    cdef readonly int64_t charged
    cdef readonly RateLimiter parent
    cdef int _draw(self, int64_t n, RateLimiter child, int64_t child_gen) noexcept nogil
    cdef void _give_back(self, int64_t n, int64_t epoch) noexcept nogil
    cdef int consume_nogil(self, int64_t n) noexcept nogil
    cdef bint limited(self) noexcept nogil
    cdef void epochs(self, int64_t* mine, int64_t* parents) noexcept nogil
    cdef void refund(self, int64_t n, int64_t mine, int64_t parents) noexcept nogil
    cdef int64_t step_bytes(self, int64_t chunk, int64_t cs)
