# cython: language_level=3
"""A pull's own reader of the backing chain, so that chunks are read without the image
lock while readers of the image use the image's drivers."""
from libc.stdint cimport int64_t

from blockpull._chain cimport Chain
from blockpull._driver cimport Driver
from blockpull._fileio cimport File


cdef class BackingReader:
    """Reads the backing images of ``chain`` (its layers below the top) for one pull,
    through drivers of its own while open, else through ``chain`` under ``lock`` (the
    image lock). The backing images never change during a pull, so both read the same
    data."""

    def __init__(self, Chain chain, lock):
        self.chain = chain
        self.lock = lock
        self.own = None
        self.files = []

    cdef open(self):
        """Open the backing images a second time, read-only, for this pull alone: the
        same open files (through /proc/self/fd), with tables and caches of their own.
        Where that is refused (no /proc, out of descriptors) chunks are read under the
        lock, as the image's readers read."""
        cdef File theirs, own
        cdef list layers = [self.chain.layers[0]]
        cdef list files = []
        self.own = None
        self.files = []
        try:
            for d in self.chain.layers[1:]:
                theirs = (<Driver>d).file
                own = File("/proc/self/fd/%d" % theirs.fd, False, theirs.role)
                own.path = theirs.path       # errors name the image, not the descriptor
                files.append((own, theirs))
                if own.identity() != theirs.identity():
                    raise OSError("reopened another file")
                layers.append(type(d)(own, False))
        except Exception:       # any refusal: read under the lock instead
            for own, _t in files:
                own.close()
            return
        self.own = Chain(layers)
        self.files = files

    cdef close(self):
        """Close the files ``open`` opened; reads go through the image's chain again."""
        cdef File own
        self.own = None
        for own, _t in self.files:
            try:
                own.close()
            except OSError:
                pass
        self.files = []

    cdef int read(self, int64_t v, unsigned char* out, int64_t n) except -1:
        """Read [v, v+n) (bytes) from the backing chain into ``out``: through this
        pull's own drivers without the lock, else under it. Raises OSError."""
        cdef File own, theirs
        if self.own is None:
            with self.lock:
                self.chain.c_read(1, v, out, n)
            return 0
        for own, theirs in self.files:
            own.faults = theirs.faults       # fault injection follows the image's files
        self.own.c_read(1, v, out, n)
        return 0
