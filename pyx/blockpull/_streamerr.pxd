# cython: language_level=3
"""The copy loop's error policy: the base of _stream.Stream (see _streamerr.pyx)."""
from libc.stdint cimport int64_t

from blockpull._driver cimport Driver
from blockpull._inflight cimport Chunk
from blockpull._q2keep cimport Packer


cdef class StreamErrors:
    cdef object lock
    cdef Driver top
    cdef object control
    cdef readonly int64_t errors
    cdef readonly int64_t done_front    # what lies before it is counted or being linked
    cdef int64_t run_epoch              # the top's failed syncs when this pass began
    cdef Packer packer

    # the copy loop's own steps (blockpull._stream.Stream)
    cdef bint finish_chunk(self, Chunk ch) except -1
    cdef _discard(self, Chunk ch)
    cdef _give_back(self, Chunk ch, int64_t k)
    cdef _link_chunk(self, Chunk ch, int64_t front)
    cdef int64_t _pending(self, int64_t offset, int64_t n) except -1
    cdef _count(self, int64_t n)

    # what it does when a chunk fails
    cdef int64_t _epoch(self)
    cdef object _settle(self, list inflight, list spare, int count)
    cdef int64_t _handle(self, tuple failed) except -1
    cdef object _on_error(self, exc)
    cdef _skipped(self, int64_t off, int64_t n)
    cdef _keep_written(self, Chunk ch, int64_t front, exc)
    cdef _partly_done(self, Chunk ch, int64_t v)
