# cython: language_level=3
"""The copy loop of a pull: plan runs, read them through the chain, skip zeros, write them
to the top image, link them in, batch the metadata.

Per chunk (at most ``chunk`` bytes of one run, cluster aligned):

1. under the image lock: re-check which top clusters are still unallocated, read them
   through the chain into a pool buffer, reserve contiguous host clusters for the ones
   that are not all zeros;
2. without the lock: one vectored write of those clusters (nobody can see them yet);
3. under the lock: link each cluster that is still unallocated (a guest write that got
   there first wins and the copy is given back); zeros over a kept base become zero
   clusters; every ``batch`` bytes the driver syncs and writes its tables.

The progress counters are C integers read without a lock. The system calls release the
GIL; nothing per cluster goes back to Python.
"""
from libc.stdint cimport int64_t
from libc.string cimport memcmp

from blockpull._driver cimport Driver, KIND_UNALLOC, KIND_DATA, KIND_ZERO, KIND_COMPRESSED
from blockpull._chain cimport Chain
from blockpull._ratelimit cimport RateLimiter
from blockpull._pool import BufferPool

import time

DEFAULT_CHUNK = 8 * 1024 * 1024
DEFAULT_BATCH = 256 * 1024 * 1024


cdef inline bint all_zero(const unsigned char* p, int64_t n) noexcept nogil:
    if n == 0:
        return True
    if p[0] != 0 or p[n - 1] != 0:
        return False
    return memcmp(p, p + 1, n - 1) == 0


class StreamIOError(Exception):
    """An I/O error inside the copy loop, tagged with the operation and offset."""

    def __init__(self, exc, operation, offset):
        super().__init__(str(exc))
        self.exc = exc
        self.errno = getattr(exc, "errno", None)
        self.operation = operation
        self.offset = offset


cdef class Stream:
    """One pull's copy loop. ``image`` is the blockpull Image (its lock and chain)."""
    cdef object image
    cdef object lock
    cdef Chain chain
    cdef Driver top
    cdef readonly int base_depth
    cdef readonly bint keep_base
    cdef public RateLimiter limiter
    cdef readonly int64_t cur
    cdef readonly int64_t end
    cdef readonly int64_t copied
    cdef readonly int64_t zeroed
    cdef readonly int64_t skipped_zero
    cdef readonly int64_t errors
    cdef readonly int64_t pos
    cdef public bint cancel_requested
    cdef public bint pause_requested
    cdef public int64_t chunk
    cdef public int64_t batch
    cdef int64_t since_batch
    cdef object pool
    cdef object control

    def __init__(self, image, int base_depth, RateLimiter limiter, control=None,
                 int64_t chunk=DEFAULT_CHUNK, int64_t batch=DEFAULT_BATCH):
        self.image = image
        self.lock = image._lock
        self.chain = <Chain>image.chain_obj
        self.top = <Driver>self.chain.layers[0]
        self.base_depth = base_depth
        self.keep_base = base_depth < self.chain.depth
        self.limiter = limiter
        self.control = control
        self.chunk = chunk
        self.batch = batch
        self.pos = 0

    # ---- planning -------------------------------------------------------------------

    cdef tuple next_run(self, int64_t pos):
        """(start, length) of the next cluster-aligned run at or after pos that the top
        lacks and that a layer above the base holds; (-1, 0) when there is none."""
        cdef Driver top = self.top
        cdef int64_t size = top.size
        cdef int64_t cs = top.cluster_size
        cdef int64_t run, host, q, qend, start, r2, h2, end
        cdef int kind, d, k2
        cdef bint inc
        while pos < size:
            kind, run, host = top.pull_status(pos, size - pos)
            if kind != KIND_UNALLOC:
                pos += run
                continue
            q = pos
            qend = pos + run
            start = -1
            end = -1
            while q < qend:
                d, k2, r2, h2 = self.chain.c_find(q, qend - q, 1, self.base_depth)
                inc = k2 != KIND_UNALLOC and (self.keep_base or k2 != KIND_ZERO)
                if inc:
                    if start < 0:
                        start = q - (q % cs)
                    q += r2
                    if q % cs:
                        q = min(q + cs - (q % cs), qend)
                    end = q
                elif start >= 0:
                    return (start, end - start)
                else:
                    q += r2
            if start >= 0:
                return (start, end - start)
            pos = qend
        return (-1, 0)

    def plan_bytes(self):
        """Bytes the pull will copy: a walk of the metadata, no data read."""
        cdef int64_t pos = 0, total = 0, s, n
        while True:
            with self.lock:
                s, n = self.next_run(pos)
            if s < 0:
                break
            total += n
            pos = s + n
        return total

    def prepare(self):
        """Compute ``end`` before the copy starts."""
        self.end = self.plan_bytes()
        return self.end

    # ---- copying --------------------------------------------------------------------

    def run(self):
        """Copy everything; returns "completed" or "cancelled". I/O errors come back
        through ``control.on_io_error(StreamIOError) -> "retry" | "skip" | "fail"``."""
        cdef int64_t s = 0, n = 0, off, take
        cdef int64_t cs = self.top.cluster_size
        cdef int64_t chunk
        cdef int64_t bufsize
        cdef bint clean = False
        chunk = max(cs, self.chunk - self.chunk % cs)
        self.pool = BufferPool(1, chunk)
        buf = self.pool.acquire()
        try:
            self.pos = 0
            while True:
                if self.cancel_requested:
                    return "cancelled"
                with self.lock:
                    s, n = self.next_run(self.pos)
                if s < 0:
                    break
                off = s
                while off < s + n:
                    if self.cancel_requested:
                        return "cancelled"
                    if self.pause_requested and self.control is not None:
                        self.control.wait_while_paused()
                        self.limiter.restart()
                        continue
                    take = min(self.chunk_limit(chunk, cs), s + n - off)
                    if self.limiter.consume(take):
                        continue  # woken: re-check cancel/pause/speed, then draw again
                    try:
                        self.copy_chunk(buf, off, take)
                    except StreamIOError as exc:
                        action = self.control.on_io_error(exc) if self.control is not None else "fail"
                        if action == "retry":
                            continue
                        if action == "skip":
                            self.errors += 1
                            self.cur += take
                            off += take
                            continue
                        raise
                    self.cur += take
                    off += take
                    self.pos = off
                    if self.cur > self.end:
                        self.end = self.cur
                self.pos = s + n
            clean = self.errors == 0
            return "completed"
        finally:
            # A clean run leaves its last batch to the caller's final flush, which
            # reports an I/O error under the job's policy; a failed or cancelled run
            # writes what it linked as best it can (its own error is already on its way).
            if not clean:
                try:
                    with self.lock:
                        self.top.flush_metadata()
                except OSError:
                    pass
            buf.release()
            self.pool = None

    cdef int64_t chunk_limit(self, int64_t chunk, int64_t cs):
        """Chunk size: smaller under a low rate so the limiter stays smooth."""
        cdef int64_t rate = self.limiter.rate
        cdef int64_t c = chunk
        if rate > 0:
            c = min(chunk, max(cs, rate // 16))
            c -= c % cs
            if c < cs:
                c = cs
        return c

    cdef copy_chunk(self, buf, int64_t off, int64_t n):
        cdef Driver top = self.top
        cdef int64_t cs = top.cluster_size
        cdef int64_t ncl = (n + cs - 1) // cs
        cdef int64_t i, j, v, host = 0, k, run, clen, nz = 0
        cdef int kind
        cdef const unsigned char[::1] mv = buf
        cdef const unsigned char* p = &mv[0]
        cdef list todo = []       # virtual offsets of clusters to copy, in order
        cdef list zeros = []
        cdef list views
        with self.lock:
            # 1. which clusters does the top still lack?
            i = 0
            while i < ncl:
                v = off + i * cs
                kind, run, _h = top.pull_status(v, n - i * cs)
                k = (run + cs - 1) // cs
                if kind == KIND_UNALLOC:
                    clen = min(run, n - i * cs)
                    try:
                        self.chain.c_read(1, v, <unsigned char*>p + i * cs, clen)
                    except OSError as exc:
                        raise StreamIOError(exc, "read", v)
                    for j in range(i, min(i + k, ncl)):
                        clen = min(cs, n - j * cs)
                        if all_zero(p + j * cs, clen):
                            if self.keep_base:
                                zeros.append(j)
                            else:
                                self.skipped_zero += clen
                        else:
                            todo.append(j)
                i += k
            if todo:
                try:
                    host = top.alloc_clusters(len(todo))
                except OSError as exc:
                    raise StreamIOError(exc, "write", off)
        if todo:
            # 2. one vectored write of the clusters to copy (unreachable until linked)
            views = []
            bmv = memoryview(buf)
            i = 0
            while i < len(todo):
                k = i
                while k + 1 < len(todo) and todo[k + 1] == todo[k] + 1:
                    k += 1
                views.append(bmv[todo[i] * cs:min((todo[k] + 1) * cs, n)])
                i = k + 1
            # a short last cluster is padded to a whole cluster on disk
            last = todo[len(todo) - 1]
            pad = (last + 1) * cs - n
            if pad > 0:
                views.append(bytes(pad))
            try:
                top.file.writev_full(views, host)
            except OSError as exc:
                with self.lock:
                    top.free_clusters(host, len(todo))
                raise StreamIOError(exc, "write", off + todo[0] * cs)
            views = None
            bmv.release()
        # 3. link what the top still lacks; a guest write that came first wins
        with self.lock:
            for i in range(len(todo)):
                v = off + todo[i] * cs
                if top.link(v, host + i * cs):
                    self.copied += min(cs, n - todo[i] * cs)
                else:
                    top.free_clusters(host + i * cs, 1)
            for j in zeros:
                v = off + j * cs
                if top.has_zero_flag:
                    if top.link_zero(v):
                        self.zeroed += min(cs, n - j * cs)
                else:
                    self._write_zero_cluster(v, min(cs, n - j * cs))
            self.since_batch += n
            if self.since_batch >= self.batch:
                self.since_batch = 0
                try:
                    top.flush_metadata()
                except OSError as exc:
                    raise StreamIOError(exc, "write", off)

    cdef _write_zero_cluster(self, int64_t v, int64_t n):
        """Zeros over a kept base, on a format without zero clusters: write zero data,
        unless a guest write got there first."""
        cdef Driver top = self.top
        kind, run, _h = top.block_status(v, n)
        if kind != KIND_UNALLOC:
            return
        try:
            top.write(v, bytes(n), None)
        except OSError as exc:
            raise StreamIOError(exc, "write", v)
        self.zeroed += n

    def finish_sync(self):
        """Make everything copied durable (before the backing link changes)."""
        with self.lock:
            self.top.flush()


def copy_on_read(image, int64_t offset, int64_t n):
    """Copy the clusters under [offset, offset+n) that the top still lacks from the
    chain into the top (the caller holds the image lock)."""
    cdef Chain chain = <Chain>image.chain_obj
    cdef Driver top = <Driver>chain.layers[0]
    cdef int64_t cs = top.cluster_size
    cdef int64_t v = offset - offset % cs
    cdef int64_t end = min(offset + n, top.size)
    cdef int64_t run, host, clen
    cdef int kind
    cdef bytearray data
    cdef unsigned char[::1] dv
    while v < end:
        kind, run, _h = top.block_status(v, end - v)
        if kind != KIND_UNALLOC:
            v += run
            continue
        run = min(run, end - v)
        run = ((run + cs - 1) // cs) * cs
        clen = min(run, top.size - v)
        data = bytearray(run)
        dv = data
        chain.c_read(1, v, &dv[0], clen)
        if all_zero(&dv[0], run):
            v += run  # zeros stay where they are: the chain reads them cheaply
            continue
        host = top.alloc_clusters(run // cs)
        top.file.writev_full([data], host)
        for i in range(run // cs):
            if not top.link(v + i * cs, host + i * cs):
                top.free_clusters(host + i * cs, 1)
        v += run
