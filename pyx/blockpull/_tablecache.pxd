# cython: language_level=3
"""Metadata tables kept in on-disk byte order, and the write-back cache that holds them
(see _tablecache.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._endian cimport ld_be64, st_be64
from blockpull._fileio cimport File


cdef class CachedTable:
    cdef unsigned char* buf
    cdef readonly int64_t offset
    cdef readonly Py_ssize_t nbytes
    cdef public bint new          # a table no durable reference names yet
    cdef bint is_dirty(self) noexcept


cdef class Table(CachedTable):
    cdef public bint dirty        # changed in memory since it was last written

    cdef inline uint64_t get(self, Py_ssize_t i) noexcept:
        return ld_be64(self.buf + 8 * i)

    cdef inline void put(self, Py_ssize_t i, uint64_t v) noexcept:
        st_be64(self.buf + 8 * i, v)
        self.dirty = True

    cdef bytes tobytes(self)
    cdef int write_entries(self, File f, object idxs) except -1


cdef class TableCache:
    cdef object tables                 # OrderedDict key -> Table, least recently used first
    cdef readonly Py_ssize_t capacity  # tables kept before clean ones are dropped

    cdef CachedTable get(self, object key)
    cdef int put(self, object key, CachedTable t) except -1
    cdef int drop_clean(self) except -1
    cdef Py_ssize_t excess(self) noexcept
