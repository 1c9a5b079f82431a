# cython: language_level=3
"""A pull that keeps compressed clusters compressed (_q2keep.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._driver cimport Driver
from blockpull._fileio cimport File
from blockpull._q2order cimport Qcow2Ordering
from blockpull._inflight cimport Chunk


cdef class KeepPlan:
    cdef readonly str mode        # "keep" or "inflate"
    cdef readonly str reason
    cdef readonly int ctype       # the compression type kept (0 zlib, 1 zstd), or -1
    cdef readonly bint switch     # the top's compression type is to be set first
    cdef bytearray eligible       # per chain depth: 1 where compressed clusters are kept
    cdef int64_t cs

    cdef File extent(self, Driver d, int depth, int64_t vaddr, int64_t* coff,
                     int64_t* clen)


cdef class Packer:
    cdef Qcow2Ordering top
    cdef int64_t cur              # next free byte of the packing cluster (0: none)
    cdef int64_t end              # the end of that cluster (bytes)

    cdef int64_t place(self, int64_t nbytes) except -1
    cdef int place_chunk(self, Chunk ch) except -1
    cdef int give_back(self, int64_t coff, int64_t nbytes) except -1
    cdef int give_back_chunk(self, Chunk ch) except -1
    cdef int give_back_from(self, Chunk ch, int64_t first) except -1
    cdef int release(self) except -1


cdef uint64_t descriptor(int cluster_bits, int64_t coff, int64_t nbytes) noexcept
cdef list kept_pieces(Chunk ch)
