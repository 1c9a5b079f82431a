# cython: language_level=3
"""The one interface every format driver implements (see _driver.pyx)."""
from libc.stdint cimport int64_t, uint64_t
from blockpull._fileio cimport File

cdef enum:
    KIND_UNALLOC = 0      # not here: read the backing file (zeros without one)
    KIND_DATA = 1         # a host run: host offset valid, contiguous for the run
    KIND_ZERO = 2         # reads as zeros here, backing not consulted
    KIND_COMPRESSED = 3   # one compressed cluster (read through read_layer)

cdef class Driver:
    cdef public File file
    cdef readonly str format
    cdef readonly int64_t size
    cdef readonly int64_t cluster_size
    cdef readonly int cluster_bits
    cdef readonly object backing_name
    cdef public object backing_format
    cdef readonly bint writable
    cdef readonly bint has_zero_flag
    cdef readonly bint external_data   # data clusters live in data_file at their guest offset
    cdef readonly File data_file       # that file once attached (qcow2's external data file)

    cpdef tuple block_status(self, int64_t vaddr, int64_t n)
    cpdef tuple pull_status(self, int64_t vaddr, int64_t n)
    cdef int read_layer(self, int64_t vaddr, unsigned char* out, int64_t n, int kind,
                        int64_t host) except -1
    cpdef int64_t alloc_clusters(self, int64_t n) except -1
    cpdef bint link(self, int64_t vaddr, int64_t host) except -1
    cpdef bint link_zero(self, int64_t vaddr) except -1
    cpdef free_clusters(self, int64_t host, int64_t n)
    cpdef write(self, int64_t vaddr, object data, object fill)
    cpdef flush_metadata(self)
    cpdef flush(self)
