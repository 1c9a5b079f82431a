# cython: language_level=3
"""The copy loop of a pull: plan runs, read them through the chain, skip zeros, write them
to the top image, link them in, batch the metadata.

Per chunk (at most ``chunk`` bytes of one run, cluster aligned):

1. under the image lock: find which top clusters are unallocated; without the lock,
   read them from the backing chain into a pool buffer (the backing images never change
   during a pull, and the pull reads them through drivers of its own, so readers of the
   image do not wait for it); under the lock again: keep the clusters the top still
   lacks (a guest write meanwhile wins) and reserve contiguous host clusters for the
   ones that are not all zeros;
2. without the lock, on a writer thread: one vectored write of those clusters (nobody
   can see them yet), through the top's O_DIRECT descriptor when it is aligned;
3. once that write has completed, under the lock: link each cluster that is still
   unallocated (a guest write that got there first wins and the copy is given back);
   zeros over a kept base become zero clusters; every ``batch`` bytes the driver syncs
   and writes its tables.

The steps overlap: while ``depth`` chunks are being written, the next one is read into a
spare buffer; chunks are linked in order. The progress counters are C integers read
without a lock. The system calls release the GIL; nothing per cluster goes back to Python.
"""
from libc.stdint cimport int64_t
from libc.string cimport memcmp

from blockpull._driver cimport Driver, KIND_UNALLOC, KIND_DATA, KIND_ZERO, KIND_COMPRESSED
from blockpull._chain cimport Chain
from blockpull._fileio cimport File
from blockpull._ratelimit cimport RateLimiter
from blockpull._pool import BufferPool

import threading
import time
from concurrent.futures import ThreadPoolExecutor

DEFAULT_CHUNK = 8 * 1024 * 1024
DEFAULT_BATCH = 256 * 1024 * 1024
DEFAULT_DEPTH = 2     # chunk writes in flight while the next chunk is read


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


cdef class _Chunk:
    """One chunk between its read and its link: where it is, what to write where."""
    cdef int64_t off
    cdef int64_t n
    cdef int64_t host
    cdef list todo
    cdef list zeros
    cdef list skips     # all-zero clusters left out on a pull without a base
    cdef list views
    cdef object bmv
    cdef object future
    cdef object buf
    cdef int64_t epoch        # the top's failed syncs when the chunk was read

    cdef release_views(self):
        self.views = None
        if self.bmv is not None:
            self.bmv.release()
            self.bmv = None


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
    cdef readonly int64_t plan_pos      # ``end`` holds the plan of [0, plan_pos)
    cdef readonly int64_t done_front    # what lies before it is counted or being linked
    cdef readonly bint tracking         # guest writes are counted into ``cur``
    cdef public bint cancel_requested
    cdef public bint pause_requested
    cdef public int64_t chunk
    cdef public int64_t batch
    cdef int64_t since_batch
    cdef object pool
    cdef object control
    cdef object writer
    cdef public bint direct
    cdef public int depth
    cdef int64_t run_epoch    # the top's failed syncs when this pass began
    cdef list copying         # chunks whose clusters are being written, not linked yet
    cdef Chain reader         # the chain as this pull reads it without the lock, or None
    cdef list reader_files    # (own File, the image's File) of each backing of ``reader``
    cdef object linked        # Condition on the image lock: a chunk left ``copying``
    cdef int waiters          # guest writes waiting in await_copies

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
        self.direct = True
        self.depth = DEFAULT_DEPTH
        self.copying = []
        self.linked = threading.Condition(self.lock)

    # ---- planning -------------------------------------------------------------------

    cdef bint _hidden(self, int64_t q):
        """True when an image between the top and the base ends at or before ``q``: the
        chain reads zeros there (a read past an image's end does not fall through to
        the images below it), which the base would show through once the images above
        it are dropped. Called where the chain finds ``q`` unallocated above the base."""
        cdef int d
        for d in range(1, self.base_depth):
            if q >= (<Driver>self.chain.layers[d]).size:
                return True
        return False

    cdef tuple next_run(self, int64_t pos, int64_t limit):
        """(start, length) of the next cluster-aligned run in [pos, limit) that the top
        lacks and that the pull must fill; (-1, 0) when there is none. It must fill what
        a layer above the base holds (zero clusters only when a base is kept) and, when
        a base is kept, what reads as zeros because an image above the base ends before
        it. ``limit`` is cluster aligned or the disk's size; a run is whole clusters."""
        cdef Driver top = self.top
        cdef int64_t cs = top.cluster_size
        cdef int64_t run, host, q, qend, start, r2, h2, end
        cdef int kind, d, k2
        cdef bint inc
        limit = min(limit, top.size)
        while pos < limit:
            kind, run, host = top.pull_status(pos, limit - pos)
            if kind != KIND_UNALLOC:
                pos += run
                continue
            q = pos
            qend = min(pos + run, limit)
            start = -1
            end = -1
            while q < qend:
                d, k2, r2, h2 = self.chain.c_find(q, qend - q, 1, self.base_depth)
                if k2 == KIND_UNALLOC:
                    inc = self.keep_base and self._hidden(q)
                else:
                    inc = self.keep_base or k2 != KIND_ZERO
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
        """Bytes the pull will fill (copy, or record as zeros over a kept base): a walk of
        the metadata, no data read."""
        cdef int64_t pos = 0, total = 0, s, n, size = self.top.size
        while True:
            with self.lock:
                s, n = self.next_run(pos, size)
            if s < 0:
                break
            total += n
            pos = s + n
        return total

    def prepare(self):
        """Compute ``end`` (bytes) before the copy starts, and count guest writes into
        ``cur`` from here on (see ``guest_write_begin``)."""
        cdef int64_t pos = 0, s, n, size = self.top.size
        with self.lock:
            self.cur = self.end = self.plan_pos = self.done_front = 0
            self.tracking = True
        try:
            while True:
                with self.lock:
                    s, n = self.next_run(pos, size)
                    if s < 0:
                        self.plan_pos = size
                        break
                    self.end += n
                    pos = self.plan_pos = s + n
        except BaseException:
            with self.lock:
                self.tracking = False
            raise
        return self.end

    # ---- progress -------------------------------------------------------------------
    #
    # ``end`` is the plan made by ``prepare``; ``cur`` reaches it exactly. Every planned
    # cluster is counted once: by the copy loop when it links it (or finds it all zeros
    # on a pull without a base), or, when a guest write, a write of zeros or a
    # copy-on-read fills it first, as done by that write. The loop owns what lies before
    # ``done_front``, so a guest write there is never counted twice.

    cdef int64_t _pending(self, int64_t offset, int64_t n) except -1:
        """Planned bytes of the clusters under [offset, offset+n) that the pull would
        still fill and whose count nothing owns yet (the lock is held)."""
        cdef int64_t cs = self.top.cluster_size
        cdef int64_t a = max(offset - offset % cs, self.done_front)
        cdef int64_t b = min(offset + n, self.plan_pos)
        cdef int64_t total = 0, s, k
        if b % cs:
            b = min(b + cs - b % cs, self.plan_pos)
        while a < b:
            s, k = self.next_run(a, b)
            if s < 0:
                break
            total += k
            a = s + k
        return total

    def guest_write_begin(self, int64_t offset, int64_t n):
        """Before a write into the top at [offset, offset+n) (bytes), with the image lock
        held: a token for ``guest_write_end``, which must follow under the same lock.
        Raises OSError if the chain's tables cannot be read (nothing is written then)."""
        if not self.tracking:
            return 0
        return self._pending(offset, n)

    def guest_write_end(self, int64_t offset, int64_t n, int64_t before):
        """After that write (done or failed): the planned clusters it filled count as
        done in ``cur``; ``end`` stays."""
        cdef int64_t filled
        if not self.tracking or before <= 0:
            return
        try:
            filled = before - self._pending(offset, n)
        except OSError:
            # tables just read, now unreadable: a write that succeeded filled every
            # cluster it touched (a failed one may count ahead; end follows cur)
            filled = before
        if filled > 0:
            self._count(filled)

    cdef _count(self, int64_t n):
        self.cur += n
        if self.cur > self.end:
            self.end = self.cur

    # ---- guest writes against copies in flight ---------------------------------------
    #
    # Between ``prepare_chunk`` and its link, a chunk's clusters are written to host
    # clusters nothing points at yet. A guest write that allocated one of those top
    # clusters first would win, and the copy would be given back: on a format without
    # refcounts (QED) space given back in the middle of the file stays unreferenced, a
    # leak for ``qemu-img check``. So allocating writes are serialised per cluster, as
    # QEMU serialises them: a guest write to a cluster whose copy is in flight waits for
    # that chunk's link (one chunk's write; the lock is released while it waits), and
    # then finds the cluster allocated and writes in place. Copy-on-read leaves such a
    # cluster to the pull, which links the same data.

    cdef bint _copying(self, int64_t a, int64_t b):
        """True when a chunk in flight holds a copy, not linked yet, of a cluster that
        meets [a, b) (bytes; the lock is held)."""
        cdef _Chunk ch
        cdef int64_t cs = self.top.cluster_size
        cdef int64_t v
        for ch in self.copying:
            if ch.off >= b or ch.off + ch.n <= a:
                continue
            for j in ch.todo:
                v = ch.off + <int64_t>j * cs
                if v < b and a < v + cs:
                    return True
        return False

    def copy_in_flight(self, int64_t offset, int64_t n):
        """True when a copy of a cluster under [offset, offset+n) (bytes) is being
        written and not linked yet; the image lock is held."""
        return self._copying(offset, offset + n)

    def await_copies(self, int64_t offset, int64_t n):
        """With the image lock held, before a guest write at [offset, offset+n) (bytes):
        wait (the lock released meanwhile) until no copy of a cluster it touches is in
        flight, so that the write finds the pull's cluster linked instead of beating it.
        The copy loop, told of the wait, links its chunks in flight as soon as their
        writes are done (before it waits for bandwidth), so the wait is about one
        chunk's write; a pull that stops gives its chunks back."""
        if not self._copying(offset, offset + n):
            return
        self.waiters += 1
        try:
            self.limiter.wake()
            while self._copying(offset, offset + n):
                self.linked.wait(0.05)
        finally:
            self.waiters -= 1

    cdef _reserve(self, _Chunk ch):
        if ch.todo:
            self.copying.append(ch)

    cdef _unreserve(self, _Chunk ch):
        """The chunk is linked or given back (the lock is held): wake waiting writes."""
        cdef int i
        for i in range(len(self.copying)):
            if self.copying[i] is ch:
                del self.copying[i]
                self.linked.notify_all()
                break

    # ---- copying --------------------------------------------------------------------

    def run(self):
        """Copy everything; returns "completed" or "cancelled". I/O errors come back
        through ``control.on_io_error(StreamIOError) -> "retry" | "skip" | "fail"``.

        ``depth`` chunks are written at once by as many writer threads while the next
        chunk is read from the chain into a spare buffer; chunks are linked in order,
        each once its own write has completed. A chunk whose write fails is given back
        and handled by ``on_error``; the chunks read after it are given back too and
        read again."""
        cdef int64_t pos = 0, run_end = -1, s, n, take
        cdef int64_t cs = self.top.cluster_size
        cdef int64_t chunk
        cdef int depth = max(1, self.depth)
        cdef _Chunk ch
        cdef list inflight = []      # chunks being written, oldest first
        cdef list spare
        cdef bint clean = False
        chunk = max(cs, self.chunk - self.chunk % cs)
        if self.direct:
            self.top.file.enable_direct()
        self.pool = BufferPool(depth + 1, chunk)
        bufs = [self.pool.acquire() for _ in range(depth + 1)]
        spare = list(bufs)
        self.writer = ThreadPoolExecutor(depth, thread_name_prefix="blockpull-write")
        self.run_epoch = self._epoch()
        self._open_reader()
        try:
            self.pos = 0
            while True:
                if self.cancel_requested or (self.pause_requested and self.control is not None):
                    failed = self._settle(inflight, spare, len(inflight))
                    if self.cancel_requested:
                        return "cancelled"  # a failed write just stays uncopied
                    if failed is not None:
                        pos, run_end = self._handle(failed), -1
                        continue
                    self.control.wait_while_paused()
                    self.limiter.restart()
                    continue
                if pos >= run_end:
                    with self.lock:
                        s, n = self.next_run(pos, self.top.size)
                    if s < 0:
                        if not inflight:
                            break
                        failed = self._settle(inflight, spare, 1)
                        if failed is not None:
                            pos, run_end = self._handle(failed), -1
                        continue
                    pos = s
                    run_end = s + n
                if len(inflight) >= depth or (self.waiters and inflight):
                    # (a guest write waits for a chunk in flight: link them now)
                    failed = self._settle(inflight, spare, 1)
                    if failed is not None:
                        pos, run_end = self._handle(failed), -1
                    continue
                take = min(self.chunk_limit(chunk, cs), run_end - pos)
                if self.limiter.consume(take):
                    continue  # woken: re-check cancel/pause/speed, then draw again
                buf = spare.pop()
                try:
                    ch = self.prepare_chunk(buf, pos, take)
                except StreamIOError as exc:
                    spare.append(buf)
                    failed = self._settle(inflight, spare, len(inflight))
                    if failed is None:
                        failed = (pos, take, exc)
                    pos, run_end = self._handle(failed), -1
                    continue
                ch.buf = buf
                if ch.todo:
                    ch.future = self.writer.submit(self.top.file.pwritev_data, ch.views, ch.host)
                inflight.append(ch)
                pos += take
                self.pos = pos
            clean = self.errors == 0
            return "completed"
        finally:
            for ch in inflight:
                self._discard(ch)
            inflight = []
            self.writer.shutdown(wait=True)
            self.writer = None
            with self.lock:
                self.tracking = False
                # every chunk is linked or given back by now: nothing is in flight
                if self.copying:
                    self.copying = []
                    self.linked.notify_all()
            # A clean run leaves its last batch to the caller's final flush, which
            # reports an I/O error under the job's policy; a failed or cancelled run
            # writes what it linked as best it can (its own error is already on its way).
            if not clean:
                try:
                    with self.lock:
                        self.top.flush_metadata()
                except OSError:
                    pass
            self._close_reader()
            for b in bufs:
                b.release()
            self.pool = None

    cdef _open_reader(self):
        """Open the backing images a second time, read-only, for this pull alone: the
        same open files (through /proc/self/fd), with tables and caches of their own, so
        that chunks are read without the image lock while readers of the image use the
        image's drivers. Where that is refused (no /proc, out of descriptors) chunks are
        read under the lock, as the image's readers read."""
        cdef File theirs, own
        cdef list layers = [self.top]
        cdef list files = []
        self.reader = None
        self.reader_files = []
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
        self.reader = Chain(layers)
        self.reader_files = files

    cdef _close_reader(self):
        cdef File own
        self.reader = None
        for own, _t in self.reader_files:
            try:
                own.close()
            except OSError:
                pass
        self.reader_files = []

    cdef int _read_backing(self, int64_t v, unsigned char* out, int64_t n) except -1:
        """Read [v, v+n) from the backing chain (layers below the top) into ``out``:
        through this pull's own drivers without the lock, else under it."""
        cdef File own, theirs
        if self.reader is None:
            with self.lock:
                self.chain.c_read(1, v, out, n)
            return 0
        for own, theirs in self.reader_files:
            own.faults = theirs.faults       # fault injection follows the image's files
        self.reader.c_read(1, v, out, n)
        return 0

    cdef int64_t _epoch(self):
        """How many of the top's fdatasyncs have failed so far."""
        return getattr(self.top, "sync_failures", 0)

    def intact(self):
        """False when an fdatasync of the top failed since this pass of the copy loop
        began (or went back to the start): clusters linked before it may have been given
        back, and a new pass must copy them again before the backing link changes."""
        return self._epoch() == self.run_epoch

    cdef object _settle(self, list inflight, list spare, int count):
        """Link the ``count`` oldest chunks in flight, in order. On a failed write the
        chunks after it are given back as well; returns (offset, length, error) of the
        failed one, or None. A chunk whose data was written before a failed fdatasync
        is given back instead of linked, and returned with error None."""
        cdef _Chunk ch
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
                    later = <_Chunk>inflight.pop(0)
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
            if exc is None or self._on_error(exc) == "retry":
                self.run_epoch = self._epoch()
                return 0
            self._skipped(off, n)
            return off + n
        if exc is None:
            return off
        if self._on_error(exc) == "skip":
            self._skipped(off, n)
            return off + n
        return off

    cdef str _on_error(self, exc):
        """"retry" or "skip" as the control says; raises the error on "fail".

        Before the control hears of the error, what is linked so far is written back
        (as best the disk allows): while the job waits paused, or carries on past the
        failed chunk, the image on disk holds everything copied before the failure."""
        try:
            with self.lock:
                self.top.flush_metadata()
        except OSError:
            pass
        action = self.control.on_io_error(exc) if self.control is not None else "fail"
        if action in ("retry", "skip"):
            return action
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

    cdef _discard(self, _Chunk ch):
        """Give back the clusters of a chunk that will not be linked."""
        if ch.future is not None:
            try:
                ch.future.result()
            except OSError:
                pass
            ch.future = None
        ch.release_views()
        with self.lock:
            try:
                if ch.todo:
                    self.top.free_clusters(ch.host, len(ch.todo))
            finally:
                ch.todo = []
                self._unreserve(ch)

    cdef int64_t chunk_limit(self, int64_t chunk, int64_t cs):
        """Chunk size: under a limit, about 1/64 s of budget, so that the limiter stays
        smooth and the wait before the first chunk costs little of the achieved rate."""
        cdef int64_t rate = self.limiter.rate
        cdef int64_t c = chunk
        if rate > 0:
            c = min(chunk, max(cs, rate // 64))
            c -= c % cs
            if c < cs:
                c = cs
        return c

    cdef _Chunk prepare_chunk(self, buf, int64_t off, int64_t n):
        """Read what the top lacks in [off, off+n) from the backing chain (without the
        lock), then under the lock keep what the top still lacks and reserve host
        clusters for the non-zero clusters; the views to write are set up, nothing is
        written yet.

        A guest write between the read and the re-check allocates its clusters in the
        top, and the re-check leaves them out: the guest write wins. The data read for
        the clusters kept is current: the top still lacks them, so the chain reads them
        from the backing images, which no one writes during a pull."""
        cdef Driver top = self.top
        cdef int64_t cs = top.cluster_size
        cdef int64_t ncl = (n + cs - 1) // cs
        cdef int64_t i, j, v, k, run, clen, last, pad, e
        cdef int kind
        cdef const unsigned char[::1] mv = buf
        cdef const unsigned char* p = &mv[0]
        cdef _Chunk ch = _Chunk.__new__(_Chunk)
        cdef list runs = []       # (first cluster, clusters, bytes) the top lacked
        cdef bytearray state = bytearray(ncl)   # 1 data, 2 all zeros, per cluster read
        cdef unsigned char[::1] stv = state
        cdef unsigned char* st = &stv[0]
        cdef list todo = []       # cluster indexes (within the chunk) to copy, in order
        cdef list zeros = []
        cdef list skips = []
        cdef list views
        ch.off = off
        ch.n = n
        with self.lock:
            ch.epoch = self._epoch()
            i = 0
            while i < ncl:
                v = off + i * cs
                kind, run, _h = top.pull_status(v, n - i * cs)
                k = (run + cs - 1) // cs
                if kind == KIND_UNALLOC:
                    runs.append((i, min(k, ncl - i), min(run, n - i * cs)))
                i += k
        for i, k, clen in runs:
            v = off + i * cs
            try:
                self._read_backing(v, <unsigned char*>p + i * cs, clen)
            except OSError as exc:
                raise StreamIOError(exc, "read", v)
            with nogil:     # a whole chunk's scan: let readers of the image run
                for j in range(i, i + k):
                    clen = min(cs, n - j * cs)
                    st[j] = 2 if all_zero(p + j * cs, clen) else 1
        with self.lock:
            # the re-check: what a guest write filled meanwhile is its own
            for i, k, _n in runs:
                e = i + k
                while i < e:
                    v = off + i * cs
                    kind, run, _h = top.pull_status(v, min((e - i) * cs, n - i * cs))
                    k = min((run + cs - 1) // cs, e - i)
                    if kind == KIND_UNALLOC:
                        for j in range(i, i + k):
                            if state[j] == 1:
                                todo.append(j)
                            elif self.keep_base:
                                zeros.append(j)
                            else:
                                self.skipped_zero += min(cs, n - j * cs)
                                skips.append(j)
                    i += k
            if todo or zeros:
                try:
                    # tables before data: once the data is written, linking it needs
                    # no space (a full disk fails here, before anything is written)
                    top.ensure_tables(off, n)
                    if todo:
                        ch.host = top.alloc_clusters(len(todo))
                except OSError as exc:
                    raise StreamIOError(exc, "write", off)
            ch.todo = todo
            self._reserve(ch)
        ch.zeros = zeros
        ch.skips = skips
        if todo:
            # one vectored write of the clusters to copy (unreachable until linked)
            views = []
            ch.bmv = memoryview(buf)
            i = 0
            while i < len(todo):
                k = i
                while k + 1 < len(todo) and todo[k + 1] == todo[k] + 1:
                    k += 1
                views.append(ch.bmv[<int64_t>todo[i] * cs:min((<int64_t>todo[k] + 1) * cs, n)])
                i = k + 1
            # a short last cluster is padded to a whole cluster on disk
            last = todo[len(todo) - 1]
            pad = (last + 1) * cs - n
            if pad > 0:
                views.append(bytes(pad))
            ch.views = views
        return ch

    cdef bint finish_chunk(self, _Chunk ch) except -1:
        """Wait for the chunk's write, then under the lock link each cluster the top still
        lacks (a guest write that came first wins and the copy is given back). False,
        with the chunk given back, when an fdatasync of the top failed since the chunk
        was read: its data may have been lost with that sync's pages.

        Clusters are linked in virtual order, so that a failure at ``v`` leaves every
        cluster before it done and the chunk to retry is [v, end). Progress counts the
        clusters this fills; a cluster a guest write filled first was counted by that
        write, and one before ``done_front`` (a chunk done again after an error) was
        counted before."""
        cdef Driver top = self.top
        cdef int64_t cs = top.cluster_size
        cdef int64_t i, j, k, v, clen, n = ch.n, off = ch.off, host = ch.host
        cdef int64_t front = self.done_front
        cdef list todo = ch.todo
        if ch.future is not None:
            fut, ch.future = ch.future, None
            try:
                fut.result()
            except OSError as exc:
                ch.release_views()
                with self.lock:
                    try:
                        top.free_clusters(host, len(todo))
                    finally:
                        ch.todo = []
                        self._unreserve(ch)
                raise StreamIOError(exc, "write", off + <int64_t>todo[0] * cs)
        ch.release_views()
        with self.lock:
            if self._epoch() != ch.epoch:
                try:
                    if todo:
                        top.free_clusters(host, len(todo))
                finally:
                    ch.todo = []
                    self._unreserve(ch)
                return False
            order = sorted([(<int64_t>todo[i], 0, i) for i in range(len(todo))] +
                           [(<int64_t>j, 1, 0) for j in ch.zeros] +
                           [(<int64_t>j, 2, 0) for j in ch.skips])
            k = 0           # todo[k:] are neither linked nor given back yet
            v = off
            try:
                for j, what, i in order:
                    v = off + j * cs
                    clen = min(cs, n - j * cs)
                    if what == 0:
                        if top.link(v, host + i * cs):
                            self.copied += clen
                            if v >= front:
                                self._count(clen)
                        else:
                            top.free_clusters(host + i * cs, 1)
                        k = i + 1
                    elif what == 1:
                        if top.has_zero_flag:
                            if top.link_zero(v):
                                self.zeroed += clen
                                if v >= front:
                                    self._count(clen)
                        elif self._write_zero_cluster(v, clen) and v >= front:
                            self._count(clen)
                    elif v >= front and top.pull_status(v, cs)[0] == KIND_UNALLOC:
                        # left unallocated: done, unless a guest write filled it meanwhile
                        self._count(clen)
            except (OSError, StreamIOError) as exc:
                # linking needed a new table and there was no room (or its space could
                # not be claimed): what is linked stays, the rest is given back and
                # reported from the first cluster not done
                try:
                    if k < len(todo):
                        top.free_clusters(host + k * cs, len(todo) - k)
                finally:
                    ch.todo = []
                    self._unreserve(ch)
                self._partly_done(ch, v)
                if isinstance(exc, StreamIOError):
                    raise
                raise StreamIOError(exc, "write", v)
            ch.todo = []
            self._unreserve(ch)
            self.done_front = max(front, off + n)
            self.since_batch += n
            if self.since_batch >= self.batch:
                self.since_batch = 0
                try:
                    top.flush_metadata()
                except OSError as exc:
                    raise StreamIOError(exc, "write", off)
        return True

    cdef _partly_done(self, _Chunk ch, int64_t v):
        """A chunk failed at ``v`` after its earlier clusters were done (and counted):
        leave the chunk as [v, end) for the error policy."""
        self.done_front = max(self.done_front, v)
        ch.n -= v - ch.off
        ch.off = v

    cdef bint _write_zero_cluster(self, int64_t v, int64_t n) except -1:
        """Zeros over a kept base, on a format without zero clusters: write zero data,
        unless a guest write got there first; True if written."""
        cdef Driver top = self.top
        kind, run, _h = top.block_status(v, n)
        if kind != KIND_UNALLOC:
            return False
        try:
            # a pulled cluster like any other (not a guest write): fresh space, linked
            _cor_group(top, [bytes(top.cluster_size)], [v], top.cluster_size)
        except OSError as exc:
            raise StreamIOError(exc, "write", v)
        self.zeroed += n
        return True

    def finish_sync(self):
        """Make everything copied durable (before the backing link changes). The caller
        checks ``intact()`` afterwards, under the same lock as the link change."""
        with self.lock:
            self.top.sync_all()


cdef _cor_group(Driver top, list views, list vaddrs, int64_t cs):
    """Write a run of whole clusters into fresh host clusters and link what the top still
    lacks (a guest write that came first wins)."""
    cdef int64_t host, i
    if not vaddrs:
        return
    host = top.alloc_clusters(len(vaddrs))
    i = 0
    try:
        top.file.writev_data(views, host)
        while i < len(vaddrs):
            if not top.link(vaddrs[i], host + i * cs):
                top.free_clusters(host + i * cs, 1)
            i += 1
    except OSError:
        # nothing points at the clusters not linked yet: give them back
        top.free_clusters(host + i * cs, len(vaddrs) - i)
        raise


cdef Stream _running_stream(image):
    """The copy loop of the pull running on ``image``, or None."""
    job = image._job
    if job is None or job.done():
        return None
    return <Stream>job._stream


def copy_on_read(image, int64_t offset, int64_t n, buf=None):
    """Copy the clusters under [offset, offset+n) that the top still lacks from the
    chain into the top (the caller holds the image lock). ``buf``, when given, holds
    what the chain reads at [offset, offset+n): the clusters it covers whole are written
    from it without a second read; only partly covered edge clusters are read again.
    All-zero clusters are left where they are (the chain reads them cheaply), and so are
    clusters whose copy by a running pull is in flight (the pull links the same data;
    a second copy would only be given back)."""
    cdef Chain chain = <Chain>image.chain_obj
    cdef Driver top = <Driver>chain.layers[0]
    cdef int64_t cs = top.cluster_size
    cdef int64_t v = offset - offset % cs
    cdef int64_t end = min(offset + n, top.size)
    cdef int64_t run, vc, vend, clen
    cdef int kind
    cdef bytearray data
    cdef unsigned char[::1] dv
    cdef const unsigned char[::1] src
    cdef const unsigned char* p
    cdef list views, vaddrs
    cdef Stream st = _running_stream(image)
    bmv = None
    top.file.enable_direct()
    if buf is not None:
        bmv = memoryview(buf).cast("B")
        src = bmv
    while v < end:
        kind, run, _h = top.block_status(v, end - v)
        if kind != KIND_UNALLOC:
            v += run
            continue
        vend = v + ((min(run, end - v) + cs - 1) // cs) * cs
        views = []
        vaddrs = []
        vc = v
        while vc < vend:
            clen = min(cs, top.size - vc)
            if st is not None and st._copying(vc, vc + clen):
                _cor_group(top, views, vaddrs, cs)
                views = []
                vaddrs = []
                vc += cs
                continue
            if bmv is not None and vc >= offset and vc + clen <= offset + n:
                p = &src[vc - offset]
                piece = bmv[vc - offset:vc - offset + clen]
            else:
                data = bytearray(cs)
                dv = data
                chain.c_read(1, vc, &dv[0], clen)
                p = &dv[0]
                piece = data
            if all_zero(p, clen):
                _cor_group(top, views, vaddrs, cs)
                views = []
                vaddrs = []
            else:
                views.append(piece)
                if clen < cs:
                    views.append(bytes(cs - clen))
                vaddrs.append(vc)
            vc += cs
        _cor_group(top, views, vaddrs, cs)
        views = None
        piece = None
        v = vend
