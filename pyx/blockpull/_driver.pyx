# cython: language_level=3
"""The driver interface, one small set of methods every image format implements.

A driver knows one file of one format: it answers ``block_status`` (what a virtual range
is made of in this file alone), reads what this file holds, writes with copy-on-write of
partial clusters (``fill`` reads what the layers below hold), allocates host clusters and
links them into its tables, and orders its metadata writes so that a crash at any instant
leaves a valid image (``flush_metadata``: data and counts made durable, then the tables
that point at them written; ``flush``: everything durable).

Reading through a chain, planning and copying live in ``_chain`` and ``_stream``; a new
format is one new module and one line in ``blockpull.image.DRIVERS``.
"""
from libc.string cimport memset

UNALLOC = KIND_UNALLOC
DATA = KIND_DATA
ZERO = KIND_ZERO
COMPRESSED = KIND_COMPRESSED


cdef class Driver:
    """Base class of the format drivers; methods a format cannot do raise."""

    cpdef tuple block_status(self, int64_t vaddr, int64_t n):
        """(kind, length, host) for the longest run from ``vaddr`` (at most ``n`` bytes)
        that this file alone answers in one way."""
        raise NotImplementedError

    cpdef tuple pull_status(self, int64_t vaddr, int64_t n):
        """block_status as a pull sees it: KIND_UNALLOC wherever the pull should link
        data (formats with internal snapshots also report what a snapshot lacks)."""
        return self.block_status(vaddr, n)

    cdef int read_layer(self, int64_t vaddr, unsigned char* out, int64_t n, int kind,
                        int64_t host) except -1:
        """Fill ``out`` with ``n`` bytes at ``vaddr`` that block_status called ``kind``."""
        if kind == KIND_ZERO:
            memset(out, 0, n)
        elif kind == KIND_DATA:
            self.file.read_full(out, n, host)
        else:
            raise NotImplementedError("%s cannot read %s clusters" % (self.format, kind))
        return 0

    cpdef int64_t alloc_clusters(self, int64_t n) except -1:
        """Reserve ``n`` contiguous host clusters (counted, not yet linked); host offset."""
        raise NotImplementedError

    cpdef bint link(self, int64_t vaddr, int64_t host) except -1:
        """Point the cluster at ``vaddr`` at ``host`` if it is still unallocated here."""
        raise NotImplementedError

    cpdef bint link_zero(self, int64_t vaddr) except -1:
        """Mark the cluster at ``vaddr`` as reading zeros, if it is still unallocated."""
        raise NotImplementedError

    cpdef free_clusters(self, int64_t host, int64_t n):
        """Give back clusters from alloc_clusters that were never linked."""
        raise NotImplementedError

    def sync_all(self):
        """Make everything written so far durable, like ``flush``, without raising for
        guest writes an earlier failed sync lost (a pull's final sync)."""
        return self.flush()

    def ensure_tables(self, int64_t vaddr, int64_t n):
        """Make (empty) the tables that linking clusters in [vaddr, vaddr+n) will need,
        before their data is written: a full disk then fails here, not after data was
        written that could not be linked. Formats without tables do nothing."""
        return None

    cpdef write(self, int64_t vaddr, object data, object fill):
        """Write ``data`` at ``vaddr``; ``fill(vaddr, buffer)`` reads the layers below."""
        raise NotImplementedError

    cpdef flush_metadata(self):
        """Sync data and counts, then write the tables that point at them."""
        raise NotImplementedError

    cpdef flush(self):
        """Make everything written so far durable."""
        raise NotImplementedError

    def set_backing(self, name, fmt):
        """Rewrite the backing link (None: no backing) crash-safely."""
        raise NotImplementedError

    def attach_data_file(self, File f):
        """Give a driver whose ``external_data`` is set the file its data clusters live
        in (opened, checked and locked by the caller); it is closed with the driver.
        Raises ValueError for a format without external data."""
        if not self.external_data:
            raise ValueError("%s has no external data file" % self.file.path)
        self.data_file = f

    def close(self):
        """Flush (if writable) and close the file (and the data file)."""
        try:
            if self.file is not None and not self.file.closed:
                try:
                    if self.writable:
                        self.flush()
                finally:
                    self.file.close()
        finally:
            if self.data_file is not None and not self.data_file.closed:
                self.data_file.close()
