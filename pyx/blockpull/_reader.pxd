# cython: language_level=3
from libc.stdint cimport int64_t

from blockpull._chain cimport Chain
from blockpull._q2keep cimport KeepPlan
from blockpull._fileio cimport File


cdef class BackingReader:
    cdef Chain chain
    cdef object lock
    cdef Chain own
    cdef list files

    cdef open(self)
    cdef close(self)
    cdef int read(self, int64_t v, unsigned char* out, int64_t n) except -1
    cdef int follow_faults(self) except -1
    cdef File kept_extent(self, KeepPlan keep, int64_t v, int64_t n, int64_t* run,
                          int64_t* coff, int64_t* clen)


cdef class ReaderPool:
    cdef Chain chain
    cdef object lock
    cdef list readers
    cdef object free
    cdef object threads

    cdef open(self, int depth)
    cdef close(self)
    cdef object submit(self, list runs, int64_t off, int64_t n, int64_t cs, buf,
                       bytearray state, KeepPlan keep=*, dict craw=*)
