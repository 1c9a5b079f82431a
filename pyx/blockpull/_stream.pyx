# cython: language_level=3
"""The copy loop of a pull: plan runs, read them through the chain, skip zeros, write them
to the top image, link them in, batch the metadata.

Per chunk (at most ``chunk`` bytes of one run, cluster aligned):

1. under the image lock: find which top clusters are unallocated; without the lock, on
   a reader thread: read them from the backing chain into a pool buffer (the backing
   images never change during a pull, and the pull reads them through drivers of its
   own, so readers of the image do not wait for it); under the lock again, in virtual
   order: keep the clusters the top still lacks (a guest write meanwhile wins) and
   reserve contiguous host clusters for the ones that are not all zeros;
2. without the lock, on a writer thread: one vectored write of those clusters (nobody
   can see them yet), through the top's O_DIRECT descriptor when it is aligned;
3. once that write has completed, under the lock: link each cluster that is still
   unallocated (a guest write that got there first wins and the copy is given back);
   zeros over a kept base become zero clusters; every ``batch`` bytes the driver syncs
   and writes its tables.

The steps overlap: while ``depth`` chunks are being written, the next ``read_depth``
ones are read into spare buffers, by as many reader threads (each with drivers of its
own: compressed clusters are inflated on every core); chunks are kept and linked in
order. Buffers come from one pool of ``depth + read_depth`` chunks. The rate limiter is
drawn from before each chunk's read, for what the top lacks of it then, and what the
re-check finds filled meanwhile is given back: a limited pull pays for the clusters it
reads and copies, not for ranges copy-on-read or guest writes filled. The progress
counters are C integers read without a lock. The system calls release the GIL; nothing
per cluster goes back to Python.

A read in flight holds no reservation: a guest write into its range goes ahead (and
wins at the re-check), and copy-on-read of that range reads the chain itself, as it
did before reads ran ahead; only the copies between reservation and link
(``_inflight.Flight``) make guest writes wait.

The plan is ``_plan.Planner``'s (and ``_plan.lacking``), the reads without the lock go
through ``_reader.ReaderPool``, and the copies in flight (which guest writes wait for)
are kept in ``_inflight.Flight``; all are cimported, their methods called in C. What a
failed chunk leads to (the error policy) is ``_streamerr.StreamErrors``, Stream's base.
"""
from libc.stdint cimport int64_t

from blockpull._driver cimport Driver, KIND_UNALLOC
from blockpull._chain cimport Chain
from blockpull._inflight cimport Chunk, Flight, keep_lacking, write_zero_cluster
from blockpull._inflight import write_at_guest, write_at_host
from blockpull._plan cimport Planner, lacking
from blockpull._ratelimit cimport RateLimiter
from blockpull._reader cimport ReaderPool
from blockpull._q2keep cimport KeepPlan, Packer, descriptor, kept_pieces
from blockpull._streamerr cimport StreamErrors
from blockpull._q2keep import write_kept
from blockpull._pool import BufferPool
from blockpull.errors import StreamIOError

from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

DEFAULT_CHUNK = 8 * 1024 * 1024
DEFAULT_BATCH = 256 * 1024 * 1024
DEFAULT_DEPTH = 2     # chunk writes in flight while the next chunks are read
DEFAULT_READ_DEPTH = 4  # chunk reads in flight (reader threads)
MAX_READ_DEPTH = 64     # a pass holds depth + read_depth chunk buffers


cdef class Stream(StreamErrors):
    """One pull's copy loop over ``chain`` (a blockpull._chain.Chain) into its top driver
    ``top`` (``chain.layers[0]``), down to chain index ``base_depth`` (the chain's depth:
    no base), under ``lock``, the image lock that every writer of the top holds. The
    copy is paced by ``limiter`` (bytes/s) and steered by ``control`` (the job:
    ``wait_while_paused()``, ``on_io_error(StreamIOError)``); ``chunk`` and ``batch``
    are bytes; ``depth`` chunk writes and ``read_depth`` chunk reads are in flight at
    once. ``flight`` holds its copies in flight, which writes into the top wait for
    (``await_copies``) and copy-on-read leaves alone. Raises ValueError when ``top``
    is not the chain's top."""
    cdef Chain chain
    cdef readonly Flight flight
    cdef readonly int base_depth
    cdef readonly bint keep_base
    cdef public RateLimiter limiter
    cdef readonly int64_t cur
    cdef readonly int64_t end
    cdef readonly int64_t copied
    cdef readonly int64_t zeroed
    cdef readonly int64_t skipped_zero
    cdef readonly int64_t plan_pos      # ``end`` holds the plan of [0, plan_pos)
    cdef readonly bint tracking         # guest writes are counted into ``cur``
    cdef public bint cancel_requested
    cdef public bint pause_requested
    cdef public int64_t chunk
    cdef public int64_t batch
    cdef int64_t since_batch
    cdef object pool
    cdef object writer
    cdef public bint direct
    cdef public int depth
    cdef public int read_depth
    cdef ReaderPool readers
    cdef Planner planner
    cdef public KeepPlan keep       # compressed clusters kept as they are, or None
    cdef readonly int64_t kept      # bytes (virtual) linked as compressed clusters

    def __init__(self, Chain chain, Driver top, lock, int base_depth, RateLimiter limiter,
                 control=None, int64_t chunk=DEFAULT_CHUNK, int64_t batch=DEFAULT_BATCH):
        if chain.layers[0] is not top:
            raise ValueError("the top driver must be the chain's first layer")
        self.lock = lock
        self.chain = chain
        self.top = top
        self.flight = Flight(lock, limiter, top.cluster_size)
        self.readers = ReaderPool(chain, lock)
        self.planner = Planner(chain, base_depth)
        self.base_depth = base_depth
        self.keep_base = base_depth < chain.depth
        self.limiter = limiter
        self.control = control
        self.chunk = chunk
        self.batch = batch
        self.direct = True
        self.depth = DEFAULT_DEPTH
        self.read_depth = DEFAULT_READ_DEPTH

    # ---- planning -------------------------------------------------------------------

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
                    s, n = self.planner.next_run(pos, size)
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
            s, k = self.planner.next_run(a, b)
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

    # ---- guest writes against copies in flight (see blockpull._inflight) ------------

    def await_copies(self, int64_t offset, int64_t n):
        """With the image lock held, before a guest write at [offset, offset+n) (bytes):
        wait, the lock released meanwhile, until no copy of a cluster it touches is in
        flight (``Flight.await_copies``)."""
        self.flight.await_copies(offset, n)

    # ---- copying --------------------------------------------------------------------

    def run(self):
        """Copy everything; returns "completed" or "cancelled". An I/O error goes to
        ``control.on_io_error(StreamIOError)``, which answers with the error policy it
        applied (``blockpull.policy.OnError``): "report" (the error is raised), "stop"
        (the control paused and was resumed: the chunk is tried again) or "ignore" (the
        chunk is given up and counted in ``errors``).

        ``read_depth`` chunks are read from the chain at once by as many reader threads
        while ``depth`` chunks are written by as many writer threads; chunks are kept
        in order as their reads complete, and linked in order, each once its own write
        has completed. A chunk whose read or write fails is given back and handled by
        ``on_error``; the chunks after it are given back too and read again."""
        cdef int64_t pos = 0, run_end = -1, s = -1, n = 0, take
        cdef int64_t cs = self.top.cluster_size
        cdef int64_t chunk = max(cs, self.chunk - self.chunk % cs)
        cdef int depth = max(1, self.depth)
        cdef int rdepth = max(1, self.read_depth)
        cdef Chunk ch
        cdef list inflight = []      # chunks being written, oldest first
        cdef list reads = []         # chunks being read, in virtual order
        cdef list bufs = self._begin_run(depth, rdepth, chunk)
        cdef list spare = list(bufs)
        cdef bint clean = False
        failed = None
        try:
            while True:
                if failed is not None:
                    # the chunks after a failed one are read again from where it says
                    pos, run_end, failed = self._restart(reads, spare, failed), -1, None
                    continue
                if self.cancel_requested or (self.pause_requested and self.control is not None):
                    failed = self._settle(inflight, spare, len(inflight))
                    if self.cancel_requested:
                        return "cancelled"  # a failed write just stays uncopied
                    if failed is None:
                        self._await_reads(reads)   # nothing is read while paused
                        self.control.wait_while_paused()
                        self.limiter.restart()
                    continue
                if self.flight.waiters and inflight:
                    # a guest write waits for a chunk in flight: link them now
                    failed = self._settle(inflight, spare, 1)
                    continue
                if len(reads) < rdepth:
                    if pos >= run_end:
                        with self.lock:
                            s, n = self.planner.next_run(pos, self.top.size)
                        if s >= 0:
                            pos, run_end = s, s + n
                    if pos < run_end:
                        take = min(self.limiter.step_bytes(chunk, cs), run_end - pos)
                        ch = self._plan_chunk(pos, take)
                        if self._charge(ch):
                            continue  # woken: re-check cancel/pause/speed, then draw again
                        self._start_read(ch, spare.pop(),
                                         ch.charge > 0 and self.limiter.limited())
                        reads.append(ch)
                        pos += take
                        continue
                if not reads:
                    if not inflight:
                        break
                    failed = self._settle(inflight, spare, 1)
                    continue
                if len(inflight) >= depth or (inflight and self._write_first(reads[0], inflight[0])):
                    failed = self._settle(inflight, spare, 1)
                    continue
                ch = reads.pop(0)
                try:
                    self._finish_read(ch)
                except StreamIOError as exc:
                    self._drop(ch, spare)
                    failed = self._settle(inflight, spare, len(inflight))
                    if failed is None:
                        failed = (ch.off, ch.n, exc)
                    continue
                self._submit_write(ch)
                inflight.append(ch)
            clean = self.errors == 0
            return "completed"
        finally:
            self._end_run(inflight, reads, bufs, clean)

    cdef _submit_write(self, Chunk ch):
        """Start the chunk's write on a writer thread: into the external data file at
        guest offsets, or into the image file (kept compressed bytes after the data).
        Every writer reports a failure the same way (``OSError.written``, see
        blockpull._inflight)."""
        cdef int64_t cs = self.top.cluster_size
        if ch.todo and ch.host < 0:
            ch.future = self.writer.submit(write_at_guest, self.top.data_file, ch, cs)
        elif ch.ctodo:
            ch.future = self.writer.submit(write_kept, self.top.file, ch, cs, kept_pieces(ch))
        elif ch.todo:
            ch.future = self.writer.submit(write_at_host, self.top.file, ch, cs)

    cdef list _begin_run(self, int depth, int rdepth, int64_t chunk):
        """Set up a pass of the copy loop: ``depth + rdepth`` pool buffers of ``chunk``
        bytes (returned), ``depth`` writer threads, ``rdepth`` reader threads with this
        pull's own readers of the chain."""
        if self.direct:
            self.top.file.enable_direct()
            if self.top.data_file is not None:
                self.top.data_file.enable_direct()
        self.pool = BufferPool(depth + rdepth, chunk)
        bufs = [self.pool.acquire() for _ in range(depth + rdepth)]
        self.writer = ThreadPoolExecutor(depth, thread_name_prefix="blockpull-write")
        self.run_epoch = self._epoch()
        self.readers.open(rdepth)
        if self.keep is not None:
            self.packer = Packer(self.top)
        return bufs

    cdef _end_run(self, list inflight, list reads, list bufs, bint clean):
        """End a pass: give back the chunks still in flight, stop the writers and the
        readers, stop counting guest writes, release the buffers.

        A clean run leaves its last batch to the caller's final flush, which reports an
        I/O error under the job's policy; a failed or cancelled run writes what it
        linked as best it can (its own error is already on its way)."""
        cdef Chunk ch
        for ch in inflight:
            self._discard(ch)
        self._await_reads(reads)
        for ch in reads:
            self._refund(ch, 0)     # read, never copied
        self.writer.shutdown(wait=True)
        self.writer = None
        with self.lock:
            self.tracking = False
            # every chunk is linked or given back by now: nothing is in flight
            self.flight.clear()
            if self.packer is not None:
                self.packer.release()
                self.packer = None
        if not clean:
            try:
                with self.lock:
                    self.top.flush_metadata()
            except OSError:
                pass
        self.readers.close()       # (after its threads have stopped)
        for b in bufs:
            b.release()
        self.pool = None

    def intact(self):
        """False when an fdatasync of the top failed since this pass of the copy loop
        began (or went back to the start): clusters linked before it may have been given
        back, and a new pass must copy them again before the backing link changes."""
        return self._epoch() == self.run_epoch

    cdef _discard(self, Chunk ch):
        """Give back the clusters of a chunk that will not be linked."""
        if ch.future is not None:
            try:
                ch.future.result()
            except OSError:
                pass
            ch.future = None
        ch.release_views()
        with self.lock:
            self._give_back(ch, 0)

    cdef _give_back(self, Chunk ch, int64_t k):
        """Give back the host clusters of ``ch.todo[k:]``, which are not linked; the
        chunk leaves the flight (the lock is held); so do its kept compressed bytes
        not linked yet."""
        try:
            if k < len(ch.todo) and ch.host >= 0:    # (-1: guest offsets, nothing held)
                self.top.free_clusters(ch.host + k * self.top.cluster_size, len(ch.todo) - k)
        finally:
            ch.todo = []
            try:
                if ch.cplaces:
                    self.packer.give_back_chunk(ch)
            finally:
                ch.ctodo = ch.cplaces = None
                ch.craw = None
                self.flight.unreserve(ch)

    cdef Chunk _plan_chunk(self, int64_t off, int64_t n):
        """A chunk over [off, off+n) with what the top lacks of it now (``runs``), which
        is what it is charged for (``charge``, bytes); nothing is read yet."""
        cdef int64_t cs = self.top.cluster_size
        cdef Chunk ch = Chunk.__new__(Chunk)
        ch.off = off
        ch.n = n
        ch.state = bytearray((n + cs - 1) // cs)
        with self.lock:
            ch.epoch = self._epoch()
            ch.runs = lacking(self.top, off, n)
        ch.charge = sum([<int64_t>r[2] for r in ch.runs])
        return ch

    cdef bint _charge(self, Chunk ch) except -1:
        """Draw the chunk's charge from the rate limiter, sleeping (without the GIL)
        until its schedule allows it; True when woken early (nothing is charged, the
        chunk is dropped: it is planned again). Nothing lacking costs nothing."""
        cdef int r
        cdef RateLimiter lim = self.limiter
        if ch.charge <= 0:
            return False
        lim.epochs(&ch.charge_epochs[0], &ch.charge_epochs[1])
        with nogil:
            r = lim.consume_nogil(ch.charge)
        if r:
            ch.charge = 0
        return r != 0

    cdef _refund(self, Chunk ch, int64_t used):
        """Give back what the chunk was charged beyond ``used`` bytes (what a guest write
        or copy-on-read filled after it was planned, or all of it when it is dropped)."""
        cdef int64_t extra = ch.charge - used
        if extra > 0:
            self.limiter.refund(extra, ch.charge_epochs[0], ch.charge_epochs[1])
            ch.charge = used

    cdef _start_read(self, Chunk ch, buf, bint slept):
        """Start reading what the top lacks of the chunk (looked at again when the draw
        may have ``slept``) from the backing chain into ``buf`` on a reader thread
        (without the lock); ``_finish_read`` keeps it."""
        cdef int64_t cs = self.top.cluster_size
        ch.buf = buf
        if slept:
            with self.lock:
                ch.epoch = self._epoch()
                ch.runs = lacking(self.top, ch.off, ch.n)
        if ch.runs:
            if self.keep is not None:
                ch.craw = {}
            ch.future = self.readers.submit(ch.runs, ch.off, ch.n, cs, buf, ch.state,
                                            self.keep, ch.craw)

    cdef int _finish_read(self, Chunk ch) except -1:
        """Wait for the chunk's read (raises its StreamIOError), then under the lock keep
        what the top still lacks and reserve host clusters for the non-zero clusters;
        the views to write are set up, nothing is written yet.

        A guest write between the read and the re-check allocates its clusters in the
        top, and the re-check leaves them out: the guest write wins. The data read for
        the clusters kept is current: the top still lacks them, so the chain reads them
        from the backing images, which no one writes during a pull."""
        if ch.future is not None:
            fut, ch.future = ch.future, None
            fut.result()
        with self.lock:
            # the re-check: what a guest write filled meanwhile is its own
            keep_lacking(self.top, self.flight, ch, self.keep_base, &self.skipped_zero)
            self._refund(ch, self._kept_bytes(ch))
            if ch.ctodo:
                try:
                    self.packer.place_chunk(ch)
                except OSError as exc:
                    self._give_back(ch, 0)
                    raise StreamIOError(exc, "write", ch.off)
        if ch.todo:
            ch.set_views(self.top.cluster_size)
        return 0

    cdef int64_t _kept_bytes(self, Chunk ch) except -1:
        """Bytes of the chunk's clusters that its re-check kept (the top still lacked
        them; all were read): to copy, kept compressed, zeros, all-zero skips."""
        cdef int64_t cs = self.top.cluster_size, n = ch.n, total = 0
        cdef int64_t last = (n + cs - 1) // cs - 1     # the only one that may be short
        for lst in (ch.todo, ch.ctodo, ch.zeros, ch.skips):
            if lst:
                total += len(lst) * cs
                if <int64_t>lst[len(lst) - 1] == last:     # (each list is in order)
                    total -= last * cs + cs - n
        return total

    cdef bint _write_first(self, Chunk r, Chunk w):
        """While the read of ``r`` (the next chunk to keep) runs: True once the write of
        ``w`` (the oldest in flight) is done first, so that it is linked meanwhile;
        False once the read is done."""
        rf, wf = r.future, w.future
        if rf is None or rf.done():
            return False
        if wf is None or wf.done():
            return True
        futures.wait((rf, wf), return_when=futures.FIRST_COMPLETED)
        return not rf.done()

    cdef _drop(self, Chunk ch, list spare):
        """Give up a chunk being read (nothing is reserved for it yet): wait for its read,
        its buffer goes back to ``spare``."""
        if ch.future is not None:
            futures.wait((ch.future,))
            ch.future = None
        self._refund(ch, 0)
        spare.append(ch.buf)
        ch.buf = None

    cdef _await_reads(self, list reads):
        """Wait until no read of ``reads`` runs (their outcomes stay with them)."""
        cdef Chunk ch
        futures.wait([ch.future for ch in reads if ch.future is not None])

    cdef int64_t _restart(self, list reads, list spare, tuple failed) except -1:
        """After a failed chunk: give up the chunks being read after it, then ask
        ``on_error`` (``_handle``); the position to carry on from."""
        cdef Chunk ch
        for ch in reads:
            self._drop(ch, spare)
        del reads[:]
        return self._handle(failed)

    cdef bint finish_chunk(self, Chunk ch) except -1:
        """Wait for the chunk's write, then under the lock link each cluster the top still
        lacks (a guest write that came first wins and the copy is given back). False,
        with the chunk given back, when an fdatasync of the top failed since the chunk
        was read: its data may have been lost with that sync's pages. Every ``batch``
        bytes the driver writes its tables."""
        cdef int64_t front = self.done_front
        failed = self._await_write(ch)
        ch.release_views()
        with self.lock:
            if failed is not None:
                self._keep_written(ch, front, failed)
            if self._epoch() != ch.epoch:
                self._give_back(ch, 0)
                return False
            self._link_chunk(ch, front)
            self.done_front = max(front, ch.off + ch.n)
            self.since_batch += ch.n
            if self.since_batch >= self.batch:
                self.since_batch = 0
                try:
                    self.top.flush_metadata()
                except OSError as exc:
                    raise StreamIOError(exc, "write", ch.off)
        return True

    cdef object _await_write(self, Chunk ch):
        """Wait for the chunk's write: None when it succeeded (or there was none), else
        its OSError."""
        if ch.future is None:
            return None
        fut, ch.future = ch.future, None
        try:
            fut.result()
        except OSError as exc:
            return exc
        return None

    cdef _link_chunk(self, Chunk ch, int64_t front):
        """Link the chunk's clusters (the lock is held), in virtual order, so that a
        failure at ``v`` leaves every cluster before it done and the chunk to retry is
        [v, end). Progress counts the clusters this fills; a cluster a guest write
        filled first was counted by that write, and one before ``front`` (a chunk done
        again after an error) was counted before."""
        cdef Driver top = self.top
        cdef int64_t cs = top.cluster_size
        cdef int64_t i, j, clen, n = ch.n, off = ch.off, host = ch.host
        cdef int64_t k = 0          # todo[k:] are neither linked nor given back yet
        cdef int64_t v = off
        cdef list todo = ch.todo
        order = sorted([(<int64_t>todo[i], 0, i) for i in range(len(todo))] +
                       [(<int64_t>j, 1, 0) for j in ch.zeros] +
                       [(<int64_t>j, 2, 0) for j in ch.skips] +
                       [(<int64_t>ch.ctodo[i], 3, i) for i in range(len(ch.ctodo or ()))])
        try:
            for j, what, i in order:
                v = off + j * cs
                clen = min(cs, n - j * cs)
                if what == 0:
                    if top.link(v, v if host < 0 else host + i * cs):
                        self.copied += clen
                        if v >= front:
                            self._count(clen)
                    elif host >= 0:
                        top.free_clusters(host + i * cs, 1)
                    k = i + 1
                elif what == 1:
                    if top.has_zero_flag:
                        if top.link_zero(v):
                            self.zeroed += clen
                            if v >= front:
                                self._count(clen)
                    else:
                        try:
                            if write_zero_cluster(top, v, clen):
                                self.zeroed += clen
                                if v >= front:
                                    self._count(clen)
                        except OSError as exc:
                            raise StreamIOError(exc, "write", v)
                elif what == 3:
                    self._link_kept(ch, i, v, clen, front)
                elif v >= front and top.pull_status(v, cs)[0] == KIND_UNALLOC:
                    # left unallocated: done, unless a guest write filled it meanwhile
                    self._count(clen)
        except (OSError, StreamIOError) as exc:
            # linking needed a new table and there was no room (or its space could
            # not be claimed): what is linked stays, the rest is given back and
            # reported from the first cluster not done
            self._give_back(ch, k)
            self._partly_done(ch, v)
            if isinstance(exc, StreamIOError):
                raise
            raise StreamIOError(exc, "write", v)
        ch.todo = []
        ch.ctodo = ch.cplaces = None
        ch.craw = None
        self.flight.unreserve(ch)

    cdef int _link_kept(self, Chunk ch, int64_t i, int64_t v, int64_t clen,
                        int64_t front) except -1:
        """Link kept cluster ``ch.ctodo[i]`` at ``v`` to its compressed bytes (the lock is
        held), or give them back when a guest write filled the cluster first."""
        cdef int64_t at = ch.cplaces[i]
        cdef int64_t nb = len(ch.craw[ch.ctodo[i]])
        if self.top.link_compressed(v, descriptor(self.top.cluster_bits, at, nb)):
            self.copied += clen
            self.kept += clen
            if v >= front:
                self._count(clen)
        else:
            self.packer.give_back(at, nb)
        ch.cdone = i + 1
        return 0

    def finish_sync(self):
        """Make everything copied durable (before the backing link changes). The caller
        checks ``intact()`` afterwards, under the same lock as the link change."""
        with self.lock:
            self.top.sync_all()


