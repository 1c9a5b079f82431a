# cython: language_level=3
"""qcow2 compressed clusters: where their bytes lie, and how they decode (_q2compress.pyx)."""
from libc.stdint cimport int64_t, uint64_t


cdef inline void comp_extent(uint64_t e, int cluster_bits, uint64_t* coff,
                             uint64_t* nbytes) noexcept nogil:
    """Host byte offset and length of the compressed data named by L2 entry ``e``: the
    offset has 62 - (cluster_bits - 8) bits, then the count of further 512-byte sectors
    (QEMU's docs/interop/qcow2.rst, "Compressed Clusters Descriptor")."""
    cdef int x = 62 - (cluster_bits - 8)
    coff[0] = e & ((1ULL << x) - 1)
    nbytes[0] = (((e >> x) & ((1ULL << (cluster_bits - 8)) - 1)) + 1) * 512 - (coff[0] & 511)


cdef class Decompressor:
    cdef readonly int64_t cluster_size
    cdef readonly int compression_type
    cdef object path
    cdef object zstd_dctx

    cpdef bytes decompress(self, bytes comp, int64_t c)
    cdef int decode(self, const unsigned char* comp, size_t clen, unsigned char* out,
                    int64_t c) except -1
    cdef int _inflate(self, const unsigned char* comp, size_t clen, unsigned char* out,
                      int64_t c) except -1
    cdef bytes _zstd(self, bytes comp)
