# cython: language_level=3
"""A pull's own readers of the backing chain, so that chunks are read without the image
lock while readers of the image use the image's drivers, several chunks at once.

Each reader thread of a ``ReaderPool`` reads through a ``BackingReader`` of its own: the
drivers' table caches (and a qcow2 driver's last decompressed cluster) are not shared
between threads, so the reads need no lock, and the preads, inflating of compressed
clusters (zlib, zstd) and zero scans of several chunks run on as many cores.
"""
from libc.stdint cimport int64_t

from blockpull._chain cimport Chain
from blockpull._driver cimport Driver, KIND_COMPRESSED
from blockpull._q2keep cimport KeepPlan
from blockpull._fileio cimport File
from blockpull._inflight cimport all_zero
from blockpull.errors import StreamIOError

from concurrent.futures import ThreadPoolExecutor
import queue


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
                own.advise_sequential()      # a pull reads its backing files in order
                files.append((own, theirs))
                if own.identity() != theirs.identity():
                    raise OSError("reopened another file")
                nd = type(d)(own, False)
                if (<Driver>d).data_file is not None:
                    # its external data file (allowed by the caller), reopened as well
                    theirs = (<Driver>d).data_file
                    own = File("/proc/self/fd/%d" % theirs.fd, False, theirs.role)
                    own.path = theirs.path
                    own.advise_sequential()
                    files.append((own, theirs))
                    if own.identity() != theirs.identity():
                        raise OSError("reopened another file")
                    nd.attach_data_file(own)
                layers.append(nd)
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
        self.follow_faults()
        self.own.c_read(1, v, out, n)
        return 0

    cdef int follow_faults(self) except -1:
        """Fault injection on the image's files (tests) applies to this pull's own."""
        cdef File own, theirs
        for own, theirs in self.files:
            own.faults = theirs.faults
        return 0


    cdef File kept_extent(self, KeepPlan keep, int64_t v, int64_t n, int64_t* run,
                          int64_t* coff, int64_t* clen):
        """Where the compressed bytes of the cluster at ``v`` lie (``KeepPlan.extent``:
        the file, ``coff[0]``, ``clen[0]``) when the backing layer that holds it keeps
        them, else None and ``run[0]`` bytes from ``v`` (``n`` bytes from there to the
        end of the range) that hold none (at least one cluster's worth). Raises
        OSError."""
        cdef Chain c = self.own
        cdef int d, kind
        cdef int64_t r
        if c is None:
            with self.lock:
                d, kind, r, _h = self.chain.c_find(v, n, 1, self.chain.depth)
                run[0] = r
                if kind != KIND_COMPRESSED:
                    return None
                return keep.extent(<Driver>self.chain.layers[d], d, v, coff, clen)
        self.follow_faults()
        d, kind, r, _h = c.c_find(v, n, 1, c.depth)
        run[0] = r
        if kind != KIND_COMPRESSED:
            return None
        return keep.extent(<Driver>c.layers[d], d, v, coff, clen)


cdef enum:
    # kept compressed bytes read in one pread: the span of back-to-back clusters (bytes),
    # and the gap between two of them that is read through rather than split at
    KEPT_SPAN = 4 * 1024 * 1024
    KEPT_GAP = 4096


cdef class KeptSpan:
    """Kept clusters whose compressed bytes lie close together in one file, read with one
    pread (``flush``) and handed out as views of it: a template's compressed clusters lie
    back to back, and one read a cluster cost a system call and a buffer each."""
    cdef File f
    cdef int64_t start, end
    cdef list parts          # (cluster index, host offset, length)

    def __init__(self):
        self.f = None
        self.parts = []

    cdef bint takes(self, File f, int64_t coff, int64_t clen):
        return (f is self.f and self.start <= coff <= self.end + KEPT_GAP
                and coff + clen - self.start <= KEPT_SPAN)

    cdef int add(self, File f, int64_t j, int64_t coff, int64_t clen) except -1:
        """Add cluster ``j``'s bytes: to the span when it ``takes`` them (the caller
        flushes it first when it does not), else as the start of a new one."""
        if self.f is None:
            self.f = f
            self.start = coff
            self.end = coff
        self.end = max(self.end, coff + clen)
        self.parts.append((j, coff, clen))
        return 0

    cdef int flush(self, int64_t off, int64_t cs, unsigned char* st, dict craw) except -1:
        """Read the span, put each cluster's bytes (a view) in ``craw`` and mark it 3 in
        ``st``. Raises StreamIOError (at the first cluster's virtual offset)."""
        cdef int64_t j, coff, clen
        if not self.parts:
            return 0
        try:
            data = memoryview(self.f.pread(self.start, self.end - self.start))
        except OSError as exc:
            raise StreamIOError(exc, "read", off + self.parts[0][0] * cs)
        for j, coff, clen in self.parts:
            craw[j] = data[coff - self.start:coff - self.start + clen]
            st[j] = 3
        self.parts = []
        self.f = None
        return 0


cdef int read_kept(BackingReader r, KeepPlan keep, list runs, int64_t off, int64_t n,
                   int64_t cs, unsigned char* p, unsigned char* st, dict craw) except -1:
    """``read_runs`` for a pull that keeps compressed clusters: a cluster whose
    compressed bytes are kept goes to ``craw`` (cluster index -> bytes), marked 3 in
    ``st``, those lying close together in one read (``KeptSpan``); the clusters between
    such ones are read as usual, a run of them at once."""
    cdef int64_t i, k, j, g, v, coff = 0, clen = 0, run = 0
    cdef File f
    cdef KeptSpan span = KeptSpan()
    for i, k, _b in runs:
        g = i              # clusters [g, j) wait to be read as usual
        j = i
        while j <= i + k:
            f = None
            if j < i + k:
                v = off + j * cs
                try:
                    f = r.kept_extent(keep, v, min((i + k) * cs, n) - j * cs, &run,
                                      &coff, &clen)
                except OSError as exc:
                    raise StreamIOError(exc, "read", v)
                if f is None:
                    # no compressed cluster in this run of the same kind
                    j = min(i + k, j + max(1, run // cs))
                    continue
            if j > g:
                read_runs(r, [(g, j - g, min((j - g) * cs, n - g * cs))], off, n, cs, p, st)
            if f is not None:
                if not span.takes(f, coff, clen):
                    span.flush(off, cs, st, craw)
                span.add(f, j, coff, clen)
            j += 1
            g = j
    span.flush(off, cs, st, craw)
    return 0


cdef int read_runs(BackingReader r, list runs, int64_t off, int64_t n, int64_t cs,
                   unsigned char* p, unsigned char* st) except -1:
    """Read ``runs`` ((first cluster, clusters, bytes) of the chunk [off, off+n)) from the
    backing chain through ``r`` into ``p`` and mark each cluster read in ``st``: 1 data,
    2 all zeros. Raises StreamIOError at the run that failed."""
    cdef int64_t i, j, k, v, clen
    for i, k, clen in runs:
        v = off + i * cs
        try:
            r.read(v, p + i * cs, clen)
        except OSError as exc:
            raise StreamIOError(exc, "read", v)
        with nogil:     # a whole chunk's scan: let readers of the image run
            for j in range(i, i + k):
                clen = min(cs, n - j * cs)
                st[j] = 2 if all_zero(p + j * cs, clen) else 1
    return 0


cdef class ReaderPool:
    """``depth`` reader threads of one pull over the backing images of ``chain``, each
    with a ``BackingReader`` of its own (``lock``: the image lock, for a reader whose
    images could not be reopened). ``submit`` reads a chunk's runs on one of them."""

    def __init__(self, Chain chain, lock):
        self.chain = chain
        self.lock = lock
        self.readers = []
        self.free = None
        self.threads = None

    cdef open(self, int depth):
        """Start ``depth`` (at least 1) reader threads and open their readers."""
        cdef BackingReader r
        depth = max(1, depth)
        self.free = queue.SimpleQueue()
        self.readers = []
        for _ in range(depth):
            r = BackingReader(self.chain, self.lock)
            r.open()
            self.readers.append(r)
            self.free.put(r)
        self.threads = ThreadPoolExecutor(depth, thread_name_prefix="blockpull-pull-read")

    cdef close(self):
        """Wait for the reads submitted, stop the threads, close the readers."""
        cdef BackingReader r
        if self.threads is not None:
            self.threads.shutdown(wait=True)
            self.threads = None
        for r in self.readers:
            r.close()
        self.readers = []
        self.free = None

    cdef object submit(self, list runs, int64_t off, int64_t n, int64_t cs, buf,
                       bytearray state, KeepPlan keep=None, dict craw=None):
        """Read ``runs`` of the chunk [off, off+n) (see ``read_runs``) into ``buf`` and
        ``state`` on a reader thread; the future of it (its result raises
        StreamIOError). With ``keep`` (a plan in "keep" mode), compressed clusters it
        keeps go to ``craw`` as they are (``read_kept``)."""
        return self.threads.submit(self._read, runs, off, n, cs, buf, state, keep, craw)

    def _read(self, list runs, int64_t off, int64_t n, int64_t cs, buf, bytearray state,
              KeepPlan keep, dict craw):
        cdef const unsigned char[::1] mv = buf
        cdef unsigned char[::1] stv = state
        cdef BackingReader r = self.free.get()
        try:
            if keep is not None:
                read_kept(r, keep, runs, off, n, cs, <unsigned char*>&mv[0], &stv[0], craw)
            else:
                read_runs(r, runs, off, n, cs, <unsigned char*>&mv[0], &stv[0])
        finally:
            self.free.put(r)
