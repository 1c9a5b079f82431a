# cython: language_level=3
"""raw: the file is the disk. Only ever a backing file here; holes read as zeros.

As in QEMU, the disk is the file's length rounded up to 512 bytes (QEMU's block layer
counts lengths in 512-byte sectors): the bytes past the file's end read as zeros."""
from libc.stdint cimport int64_t
from blockpull._fileio cimport File
from blockpull._driver cimport Driver, KIND_DATA, KIND_ZERO, KIND_UNALLOC


cdef class Raw(Driver):
    """A raw image file, read-only; ``block_status`` maps holes with SEEK_DATA/SEEK_HOLE.
    ``size`` (bytes) is the file's length rounded up to 512; the tail past the file's
    end is a hole."""
    cdef int64_t _data_start
    cdef int64_t _data_end

    def __init__(self, File f, bint writable=False):
        if writable:
            raise ValueError("raw images are only used as read-only backing files")
        self.file = f
        self.writable = False
        self.format = "raw"
        self.size = (f.size() + 511) & ~511LL
        self.cluster_size = 65536
        self.cluster_bits = 16
        self.backing_name = None
        self.backing_format = None
        self.has_zero_flag = False
        self._data_start = -1
        self._data_end = -1

    cpdef tuple block_status(self, int64_t vaddr, int64_t n):
        cdef int64_t limit
        if vaddr >= self.size:
            return (KIND_UNALLOC, n, 0)
        limit = min(n, self.size - vaddr)
        if not (self._data_start <= vaddr < self._data_end):
            r = self.file.next_data(vaddr)
            if r is None:
                return (KIND_ZERO, limit, 0)
            self._data_start, self._data_end = r
            if self._data_start > vaddr:
                return (KIND_ZERO, min(limit, self._data_start - vaddr), 0)
        return (KIND_DATA, min(limit, self._data_end - vaddr), vaddr)

    cpdef flush(self):
        pass

    cpdef flush_metadata(self):
        pass


def probe(bytes head):
    return True
