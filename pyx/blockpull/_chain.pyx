# cython: language_level=3
"""A stack of drivers, top first: read through it and find where each range lives."""
from libc.stdint cimport int64_t
from libc.string cimport memset
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from blockpull._driver cimport Driver, KIND_UNALLOC, KIND_DATA, KIND_ZERO, KIND_COMPRESSED


cdef class Chain:
    """``layers[0]`` is the top image, ``layers[-1]`` the bottom of the chain."""

    def __init__(self, list layers):
        self.layers = layers
        self.depth = len(layers)

    cdef tuple c_find(self, int64_t vaddr, int64_t n, int start, int stop):
        """(depth, kind, length, host): the first layer in [start, stop) that holds the
        range from vaddr, and how far it holds it in one way. Unallocated everywhere:
        kind is KIND_UNALLOC and depth the last layer whose size covers vaddr."""
        cdef int d = start
        cdef int last = start
        cdef Driver drv
        cdef int kind
        cdef int64_t run, host
        while d < stop:
            drv = <Driver>self.layers[d]
            if vaddr >= drv.size:
                # reads past a backing file's end are zeros
                return (last, KIND_UNALLOC, n, 0)
            kind, run, host = drv.block_status(vaddr, n)
            if run <= 0:
                raise RuntimeError("block_status made no progress")
            if kind != KIND_UNALLOC:
                return (d, kind, run, host)
            n = run
            last = d
            d += 1
        return (last, KIND_UNALLOC, n, 0)

    def find(self, int64_t vaddr, int64_t n, int start=0, stop=None):
        """Python face of c_find."""
        return self.c_find(vaddr, n, start, self.depth if stop is None else stop)

    cdef int c_read(self, int start, int64_t vaddr, unsigned char* out, int64_t n) except -1:
        cdef int64_t pos = 0, run, host
        cdef int d, kind
        while pos < n:
            d, kind, run, host = self.c_find(vaddr + pos, n - pos, start, self.depth)
            if kind == KIND_UNALLOC:
                memset(out + pos, 0, run)
            else:
                (<Driver>self.layers[d]).read_layer(vaddr + pos, out + pos, run, kind, host)
            pos += run
        return 0

    def readinto(self, int64_t vaddr, buf, int start=0):
        """Read through layers[start:] into the writable buffer ``buf``; returns its size."""
        cdef Py_buffer pb
        PyObject_GetBuffer(buf, &pb, PyBUF_WRITABLE)
        try:
            self.c_read(start, vaddr, <unsigned char*>pb.buf, pb.len)
            return pb.len
        finally:
            PyBuffer_Release(&pb)

    def read(self, int64_t vaddr, Py_ssize_t n, int start=0):
        """Bytes at [vaddr, vaddr+n) as layers[start:] read them."""
        out = PyBytes_FromStringAndSize(NULL, n)
        self.c_read(start, vaddr, <unsigned char*>PyBytes_AS_STRING(out), n)
        return out

    def filler(self, int start):
        """A ChainFill over layers[start:], for copy-on-write."""
        return ChainFill(self, start)

    cpdef bint reads_zero(self, int64_t vaddr, int64_t n, int start=0) except -1:
        """Whether [vaddr, vaddr+n) reads as zeros through layers[start:] by block
        status alone (zero or unallocated everywhere, or past a layer's end), as QEMU
        judges whether a range already reads zeros before a zero write: data that
        happens to be zero bytes does not count."""
        cdef int64_t run, host
        cdef int d, kind
        while n > 0:
            d, kind, run, host = self.c_find(vaddr, n, start, self.depth)
            if kind != KIND_UNALLOC and kind != KIND_ZERO:
                return False
            vaddr += run
            n -= run
        return True


cdef class ChainFill:
    """``fill(vaddr, buffer)``: read layers[start:] of ``chain`` into ``buffer``, for
    copy-on-write; ``zeros(vaddr, n)``: ``Chain.reads_zero`` over the same layers."""
    cdef Chain chain
    cdef int start

    def __init__(self, Chain chain, int start):
        self.chain = chain
        self.start = start

    def __call__(self, int64_t vaddr, buf):
        self.chain.readinto(vaddr, buf, self.start)

    def zeros(self, int64_t vaddr, int64_t n):
        return self.chain.reads_zero(vaddr, n, self.start)
