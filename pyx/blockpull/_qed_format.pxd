# cython: language_level=3
"""QED's on-disk layout: the header and the tables (see _qed_format.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._fileio cimport File
from blockpull._endian cimport ld_le64, st_le64
from blockpull._tablecache cimport CachedTable

cdef enum:
    ZERO_ENTRY = 1                  # an L2 entry that reads as zeros (0: unallocated)
    MAX_NAME = 1023                 # longest backing file name, bytes
    MAX_TABLE_BYTES = 67108864      # largest table this package reads (64 MiB)
    L2_CACHE_BYTES = 33554432       # L2 tables kept in memory per image (32 MiB)


cdef class Table(CachedTable):
    cdef Py_ssize_t dlo
    cdef Py_ssize_t dhi

    cdef int load(self, File f) except -1
    cdef int write_dirty(self, File f) except -1

    cdef inline uint64_t get(self, Py_ssize_t i) noexcept:
        return ld_le64(self.buf + 8 * i)

    cdef inline void put(self, Py_ssize_t i, uint64_t v) noexcept:
        st_le64(self.buf + 8 * i, v)
        if 8 * i < self.dlo:
            self.dlo = 8 * i
        if 8 * i + 8 > self.dhi:
            self.dhi = 8 * i + 8

    cdef inline bint dirty(self) noexcept:
        return self.dhi > self.dlo

    cdef inline void clean(self) noexcept:
        self.dlo = self.nbytes
        self.dhi = 0

    cdef inline void touch(self, Py_ssize_t lo, Py_ssize_t hi) noexcept:
        # mark bytes [lo, hi) changed (to be written again)
        if lo < self.dlo:
            self.dlo = lo
        if hi > self.dhi:
            self.dhi = hi


cdef class QedHeader:
    cdef readonly int64_t file_size
    cdef readonly int64_t cluster_size
    cdef readonly int cluster_bits
    cdef readonly int table_size
    cdef readonly int64_t table_bytes
    cdef readonly int64_t l2_entries
    cdef readonly int l2_bits
    cdef readonly int64_t header_size
    cdef readonly int64_t header_end
    cdef readonly uint64_t features
    cdef readonly uint64_t compat_features
    cdef readonly uint64_t autoclear_features
    cdef readonly int64_t l1_offset
    cdef readonly int64_t size
    cdef readonly int64_t backing_offset
    cdef readonly int64_t backing_size
    cdef readonly object backing_name


cpdef QedHeader read_header(File f)
