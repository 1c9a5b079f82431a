# cython: language_level=3
from libc.stdint cimport int64_t

from blockpull._chain cimport Chain
from blockpull._driver cimport Driver


cdef class Planner:
    cdef Chain chain
    cdef Driver top
    cdef int base_depth
    cdef bint keep_base

    cdef bint hidden(self, int64_t q)
    cdef tuple next_run(self, int64_t pos, int64_t limit)


cdef list lacking(Driver top, int64_t off, int64_t n)
