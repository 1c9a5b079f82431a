# cython: language_level=3
"""qcow2 zero writes that allocate what QEMU allocates (_q2zero.pyx)."""
from libc.stdint cimport int64_t
from blockpull._q2sub cimport Qcow2Sub


cdef int ext_write_zeroes(Qcow2Sub d, int64_t vaddr, int64_t n, object fill) except -1
cdef bint zero_unit_whole(int kind, int64_t unit, int64_t unit_end, int64_t v,
                          int64_t end, object fill) except -1
