# cython: language_level=3
"""The copy loop's error policy: what a pull does when a chunk's read, write or link
fails, or an fdatasync of the top failed while chunks were in flight.

``StreamErrors`` is the base of ``blockpull._stream.Stream``: it holds what these steps
share with the loop (the image lock, the top driver, the job's control, the error count,
the front of what is done) and the loop calls them in C. The loop's own steps that they
use (``finish_chunk``, ``_discard``, ``_give_back``, ``_link_chunk``, ``_pending``,
``_count``) are Stream's.

On a failed chunk: the chunks after it are given back and read again; the clusters its
write let through (a full disk lets part of a write through) are linked and the rest
given back; the control's policy (``blockpull.policy.OnError``) decides whether the
chunk is tried again ("stop", after a pause), given up ("ignore") or raised ("report"),
after what is linked so far was written back.
"""
from libc.stdint cimport int64_t

from blockpull._inflight cimport Chunk
from blockpull.errors import StreamIOError


cdef int64_t first_unwritten(Chunk ch, object written) except -2:
    """The chunk's first cluster (index) in virtual order to be written, as a data
    cluster (``ch.todo``) or a kept compressed one (``ch.ctodo``), whose bytes did not
    all reach the file by ``written`` (a writer's report, see blockpull._inflight);
    -1 if none, or without a report."""
    cdef int64_t first = -1
    if written is None:
        return -1
    for j in ch.todo:
        if not written[j]:
            first = j
            break
    for j in ch.ctodo or ():
        if not written[j]:
            if first < 0 or j < first:
                first = j
            break
    return first


cdef class StreamErrors:
    """The error steps of a pull's copy loop; a base class only (see the module
    docstring): ``errors`` counts the chunks given up under on_error="ignore", and
    ``done_front`` (bytes) is where the loop's own counting of progress has reached."""

    # ---- the copy loop's own steps, defined by blockpull._stream.Stream -------------

    cdef bint finish_chunk(self, Chunk ch) except -1:
        raise NotImplementedError

    cdef _discard(self, Chunk ch):
        raise NotImplementedError

    cdef _give_back(self, Chunk ch, int64_t k):
        raise NotImplementedError

    cdef _link_chunk(self, Chunk ch, int64_t front):
        raise NotImplementedError

    cdef int64_t _pending(self, int64_t offset, int64_t n) except -1:
        raise NotImplementedError

    cdef _count(self, int64_t n):
        raise NotImplementedError

    # ---- what a failed chunk leads to -----------------------------------------------

    cdef int64_t _epoch(self):
        """How many of the top's fdatasyncs have failed so far."""
        return getattr(self.top, "sync_failures", 0)

    cdef object _settle(self, list inflight, list spare, int count):
        """Link the ``count`` oldest chunks in flight, in order. On a failed write the
        chunks after it are given back as well; returns (offset, length, error) of the
        failed one, or None. A chunk whose data was written before a failed fdatasync
        is given back instead of linked, and returned with error None."""
        cdef Chunk ch
        cdef object exc
        while count > 0 and inflight:
            ch = inflight.pop(0)
            count -= 1
            exc = None
            try:
                linked = self.finish_chunk(ch)
            except StreamIOError as e:
                linked, exc = False, e
            spare.append(ch.buf)
            ch.buf = None
            if not linked:
                # the chunks after it are given back: they are read again from there
                while inflight:
                    later = <Chunk>inflight.pop(0)
                    self._discard(later)
                    spare.append(later.buf)
                    later.buf = None
                return (ch.off, ch.n, exc)
        return None

    cdef int64_t _handle(self, tuple failed) except -1:
        """Ask ``on_error`` about a failed chunk; the position to carry on from.

        After a failed fdatasync of the top (this pull's or a guest flush's), the
        clusters linked since the last good one were given back (their data may never
        have reached the disk): a retry goes back to the start, so that they are copied
        again before anything points at them."""
        off, n, exc = failed
        if self._epoch() != self.run_epoch:
            if exc is None or self._on_error(exc) == "stop":
                self.run_epoch = self._epoch()
                return 0
            self._skipped(off, n)
            return off + n
        if exc is None:
            return off
        if self._on_error(exc) == "ignore":
            self._skipped(off, n)
            return off + n
        return off

    cdef object _on_error(self, exc):
        """The control's policy for the error: "stop" (try the chunk again) or "ignore"
        (give it up); raises the error on "report", or without a control.

        Before the control hears of the error, what is linked so far is written back
        (as best the disk allows): while the job waits paused, or carries on past the
        failed chunk, the image on disk holds everything copied before the failure."""
        try:
            with self.lock:
                self.top.flush_metadata()
        except OSError:
            pass
        policy = self.control.on_io_error(exc) if self.control is not None else "report"
        if policy == "stop" or policy == "ignore":
            return policy
        raise exc

    cdef _skipped(self, int64_t off, int64_t n):
        """A chunk given up under on_error="ignore": what it still lacked counts as
        done (a guest write that filled part of it was counted already)."""
        cdef int64_t pend
        self.errors += 1
        with self.lock:
            try:
                pend = self._pending(off, n)
            except OSError:
                pend = n      # the chain's tables fail as well: count the chunk whole
            self._count(pend)
            self.done_front = max(self.done_front, off + n)

    cdef _keep_written(self, Chunk ch, int64_t front, exc):
        """The chunk's write failed (the lock is held): link the clusters that reached
        the file before the error, in virtual order up to the first that did not (a full
        disk lets part of a write through, and with several writes in flight each may be
        cut short), give back the rest, and raise StreamIOError at the first cluster not
        linked. What reached the file is the writer's report, the same from every writer
        (``exc.written``, see blockpull._inflight). They are linked like any others,
        their data made durable before the tables that point at them (``on_error``
        flushes before the policy is asked)."""
        cdef int64_t cs = self.top.cluster_size
        cdef int64_t first = first_unwritten(ch, getattr(exc, "written", None))
        cdef int64_t start = min((ch.todo or ch.ctodo)[0], (ch.ctodo or ch.todo)[0])
        cdef int64_t k
        if first <= start or self._epoch() != ch.epoch:
            self._give_back(ch, 0)
            raise StreamIOError(exc, "write", ch.off + start * cs)
        k = len([j for j in ch.todo if j < first])
        if k < len(ch.todo) and ch.host >= 0:    # (-1: guest offsets, nothing held)
            self.top.free_clusters(ch.host + k * cs, len(ch.todo) - k)
        ch.todo = ch.todo[:k]
        if ch.masks is not None:
            ch.masks = ch.masks[:k]
        if ch.ctodo:
            self.packer.give_back_from(ch, first)
        ch.zeros = [j for j in ch.zeros if j < first]
        ch.skips = [j for j in ch.skips if j < first]
        self._link_chunk(ch, front)    # raises StreamIOError itself if linking fails
        v = ch.off + first * cs
        self._partly_done(ch, v)       # the chunk to retry (or give up) is [v, end)
        raise StreamIOError(exc, "write", v)

    cdef _partly_done(self, Chunk ch, int64_t v):
        """A chunk failed at ``v`` after its earlier clusters were done (and counted):
        leave the chunk as [v, end) for the error policy."""
        self.done_front = max(self.done_front, v)
        ch.n -= v - ch.off
        ch.off = v

