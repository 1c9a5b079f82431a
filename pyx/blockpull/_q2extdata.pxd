# cython: language_level=3
"""qcow2 extended L2 entries in an image with an external data file (_q2extdata.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._fileio cimport File
from blockpull._q2sub cimport Qcow2Sub


cdef class Qcow2ExtData(Qcow2Sub):
    cdef int _need_data_file(self) except -1
    cdef int _check_entry(self, int64_t c, uint64_t e) except -1
    cdef _unlink_fresh(self, int64_t c, int64_t host, object old)
    cdef int ext_sub_content(self, int64_t c, int sub, uint64_t e, uint64_t bm,
                             bytearray buf, int64_t at, object fill) except -1
    cdef int ext_write(self, int64_t vaddr, const unsigned char* src, int64_t n,
                       object fill) except -1
    cdef int ext_write_cluster(self, int64_t c, int64_t coff, const unsigned char* src,
                               int64_t n, object fill) except -1
    cdef bint ext_link(self, int64_t vaddr, int64_t host) except -1
    cdef uint64_t ext_lack_mask(self, int64_t c) except? 0xFFFFFFFFFFFFFFFF
    cdef int ext_data_run(self, int64_t c, const unsigned char* src, int64_t k) except -1
    cdef bint ext_data_fill(self, int64_t vaddr, object view) except -1


cdef int write_lacking(File f, object view, int64_t vaddr, uint64_t mask,
                       int sc_bits) except -1
