# cython: language_level=3
"""qcow2 cluster map: L1/L2 lookup and entry decoding (_q2map.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._fileio cimport File
from blockpull._tablecache cimport Table, TableCache
from blockpull._q2refcount cimport Refcounts
from blockpull._q2compress cimport Decompressor
from blockpull._driver cimport KIND_UNALLOC, KIND_DATA, KIND_ZERO, KIND_COMPRESSED

# L1/L2 entry bits (QEMU's docs/interop/qcow2.rst, "Cluster mapping")
cdef extern from *:
    const uint64_t OFFSET_MASK "0x00FFFFFFFFFFFE00ULL"   # host offset of a table or cluster
    const uint64_t COPIED "(1ULL << 63)"                 # refcount is exactly one
    const uint64_t COMPRESSED_FLAG "(1ULL << 62)"
    const uint64_t ZERO_FLAG "1ULL"                      # reads as zeros (v3)


cdef class ClusterMap:
    cdef File file
    cdef Refcounts rc
    cdef int cluster_bits
    cdef int64_t cluster_size
    cdef int64_t size
    cdef int version
    cdef bint extended_l2
    cdef int l2_bits
    cdef int64_t l2_entries
    cdef int sc_bits
    cdef int compression_type
    cdef Table l1
    cdef int64_t l1_size
    cdef TableCache cache           # L2 tables by host offset
    cdef Decompressor decomp
    cdef int64_t last_comp_vcluster
    cdef unsigned char* comp_in       # compressed bytes of one cluster (2 clusters' room)
    cdef unsigned char* comp_out      # the last cluster decoded for a partial read
    cdef bint ext_data              # data clusters in an external data file (incompat bit 2)
    cdef File data                  # that file (None until attached)

    cdef Table load_l2(self, int64_t off)
    cdef uint64_t l2_entry(self, int64_t cluster) except? 0xFFFFFFFFFFFFFFFF
    cdef int64_t unalloc_l1_run(self, int64_t vaddr, int64_t l1i, int64_t limit)
    cdef tuple block_status(self, int64_t vaddr, int64_t n)
    cdef int unit(self, Table t, int64_t c, int64_t l2i, int sub, int64_t* host) except -1
    cdef int read_layer(self, int64_t vaddr, unsigned char* out, int64_t n, int kind,
                        int64_t host) except -1
    cdef int decompress(self, int64_t c, unsigned char* out) except -1
    cdef tuple status_ext(self, int64_t vaddr, int64_t n)
    cdef int unit_ext(self, Table t, int64_t c, int64_t l2i, int sub, bint* hosted) except -1

    cdef inline int kind(self, uint64_t e) noexcept:
        """What a standard (64-bit) L2 entry maps its cluster to."""
        if e & COMPRESSED_FLAG:
            return KIND_COMPRESSED
        if self.version == 3 and (e & ZERO_FLAG) and not self.extended_l2:
            return KIND_ZERO
        if e & OFFSET_MASK:
            return KIND_DATA
        if self.ext_data and e & COPIED:
            return KIND_DATA        # guest cluster 0 in an external data file
        return KIND_UNALLOC
