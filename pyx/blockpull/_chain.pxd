# cython: language_level=3
from libc.stdint cimport int64_t
from blockpull._driver cimport Driver

cdef class Chain:
    cdef readonly list layers
    cdef readonly int depth
    cdef tuple c_find(self, int64_t vaddr, int64_t n, int start, int stop)
    cdef int c_read(self, int start, int64_t vaddr, unsigned char* out, int64_t n) except -1
    cpdef bint reads_zero(self, int64_t vaddr, int64_t n, int start=*) except -1
