# cython: language_level=3
from libc.stdint cimport int64_t

cdef class File:
    cdef readonly int fd
    cdef readonly object path
    cdef readonly bint writable
    cdef readonly bint is_device
    cdef readonly str role
    cdef public object faults
    cdef int dfd
    cdef bint direct_refused

    cdef int _check_open(self) except -1
    cdef int _device_fits(self, int64_t end, str what) except -1
    cdef int _fault(self, str op, int64_t off, int64_t n) except -1
    cdef int _record(self, str op, int64_t off, object data) except -1
    cdef int read_full(self, unsigned char* buf, size_t n, int64_t off) except -1
    cdef int write_full(self, const unsigned char* buf, size_t n, int64_t off) except -1
    cdef int writev_full(self, object iov_views, int64_t off) except -1
    cdef int writev_data(self, object iov_views, int64_t off) except -1
    cdef int _writev(self, object views, int64_t off, bint direct) except -1
    cdef int _fault_views(self, object views, int64_t off) except -1
    cdef int _record_views(self, object views, int64_t off, size_t done) except -1
