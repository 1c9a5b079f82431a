# cython: language_level=3
"""A fixed set of aligned buffers, lent to Python as memoryviews without copies.

A ``PoolBuffer`` exposes its memory through the buffer protocol and counts the views
lent out; it goes back to its pool only when no view is alive, so the pool never hands
out memory that someone is still reading.
"""
from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdlib cimport free
from libc.string cimport memset

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

import threading


cdef class PoolBuffer:
    """One aligned buffer from a ``BufferPool``; supports the buffer protocol."""
    cdef unsigned char* data
    cdef readonly Py_ssize_t size
    cdef readonly int exports
    cdef object pool
    cdef bint lent

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1

    def zero(self):
        memset(self.data, 0, self.size)

    def release(self):
        """Give the buffer back to its pool. Refused while views of it are alive."""
        if self.exports:
            raise BufferError("buffer still has %d exported view(s)" % self.exports)
        if self.lent:
            self.lent = False
            self.pool._give_back(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __dealloc__(self):
        free(self.data)


cdef class BufferPool:
    """``count`` buffers of ``size`` bytes aligned to ``align``; ``acquire`` blocks while
    all are lent."""
    cdef list _free
    cdef readonly Py_ssize_t size
    cdef readonly int count
    cdef object _cond

    def __init__(self, int count, Py_ssize_t size, Py_ssize_t align=4096):
        cdef void* p
        cdef PoolBuffer b
        if count <= 0 or size <= 0:
            raise ValueError("pool needs a positive count and size")
        self.size = size
        self.count = count
        self._free = []
        self._cond = threading.Condition()
        for _ in range(count):
            if posix_memalign(&p, align, size) != 0:
                raise MemoryError("cannot allocate a %d-byte buffer" % size)
            b = PoolBuffer.__new__(PoolBuffer)
            b.data = <unsigned char*>p
            b.size = size
            b.pool = self
            self._free.append(b)

    def acquire(self, timeout=None):
        """Take a free buffer (blocking up to ``timeout`` seconds; None waits forever)."""
        cdef PoolBuffer b
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise TimeoutError("no free buffer in the pool")
            b = self._free.pop()
            b.lent = True
            return b

    def _give_back(self, PoolBuffer b):
        with self._cond:
            self._free.append(b)
            self._cond.notify()

    @property
    def available(self):
        return len(self._free)
