# cython: language_level=3
"""Guest writes against a pull's copies in flight, and copy-on-read.

Between the copy loop's reservation of a chunk and its link, the chunk's clusters are
written to host clusters nothing points at yet. A guest write that allocated one of
those top clusters first would win, and the copy would be given back: on a format
without refcounts (QED) space given back in the middle of the file stays unreferenced,
a leak for ``qemu-img check``. So allocating writes are serialised per cluster, as QEMU
serialises them: a guest write to a cluster whose copy is in flight waits for that
chunk's link (one chunk's write; the lock is released while it waits), and then finds
the cluster allocated and writes in place. Copy-on-read leaves such a cluster to the
pull, which links the same data.

What reached the file: every writer of a chunk's copies (``write_at_host`` into the
image file, ``write_at_guest`` into an external data file, ``blockpull._q2keep.write_kept``
for kept compressed clusters) reports a failure the same way. The OSError it raises has
``written``: a bytearray with one byte per cluster of the chunk (index ``j`` is the
cluster at ``ch.off + j * cluster_size``), 1 where every byte the writer had to write
for that cluster reached the file before the error, 0 elsewhere. A full disk lets part
of a write through, and the copy loop links the clusters it let through
(``blockpull._streamerr``).
"""
from libc.stdint cimport int64_t, uint64_t, INT64_MAX

from blockpull._driver cimport Driver, KIND_UNALLOC
from blockpull._fileio cimport File
from blockpull._chain cimport Chain
from blockpull._ratelimit cimport RateLimiter
from blockpull._q2sub cimport SUB_ALLOC_ALL
from blockpull._q2extdata cimport Qcow2ExtData, write_lacking
from blockpull.errors import StreamIOError

import threading


cdef inline int sc_bits_of(int64_t cs) noexcept:
    """log2 of the subcluster size of clusters of ``cs`` bytes (1/32 of a cluster)."""
    cdef int b = 0
    while (1LL << b) < cs:
        b += 1
    return b - 5


cdef class Chunk:
    """One chunk of the copy loop between its read and its link: ``off``/``n`` (bytes)
    where it is in the disk, ``host`` the first of the host clusters reserved for the
    cluster indexes ``todo`` (within the chunk, in order), ``zeros`` the clusters to
    record as zeros, ``skips`` the all-zero ones left out on a pull without a base,
    ``views`` what to write, ``future`` its read, then its write, ``epoch`` the top's
    failed syncs when the chunk was planned, ``runs`` what the top lacked then ((first
    cluster, clusters, bytes)), ``state`` per cluster read: 1 data, 2 all zeros, 3
    compressed bytes kept as they are (``craw``; of those the top still lacks, ``ctodo``
    with their places ``cplaces`` in the top, see blockpull._q2keep)."""

    cdef release_views(self):
        self.views = None
        if self.bmv is not None:
            self.bmv.release()
            self.bmv = None

    cdef set_views(self, int64_t cs):
        """One vectored write of the clusters to copy (unreachable until linked): a view
        of ``buf`` per run of consecutive clusters of ``todo``, a short last cluster
        padded to a whole cluster (``cs`` bytes) on disk."""
        cdef int64_t n = self.n, i = 0, k, last, pad
        cdef list todo = self.todo
        cdef list views = []
        self.bmv = memoryview(self.buf)
        while i < len(todo):
            k = i
            while k + 1 < len(todo) and todo[k + 1] == todo[k] + 1:
                k += 1
            views.append(self.bmv[<int64_t>todo[i] * cs:min((<int64_t>todo[k] + 1) * cs, n)])
            i = k + 1
        last = todo[len(todo) - 1]
        pad = (last + 1) * cs - n
        if pad > 0:
            views.append(bytes(pad))
        self.views = views


cdef class Flight:
    """The chunks of one pull whose copies are written but not linked yet, and the guest
    writes that wait for them. ``lock`` is the image lock (held by every caller);
    ``limiter`` is the pull's, woken so that the copy loop links its chunks at once when
    a write waits; ``cluster_size`` is the top's (bytes)."""

    def __init__(self, lock, RateLimiter limiter, int64_t cluster_size):
        self.lock = lock
        self.linked = threading.Condition(lock)
        self.cs = cluster_size
        self.copying = []
        self.waiters = 0
        self.limiter = limiter

    cdef bint overlaps(self, int64_t a, int64_t b):
        """True when a chunk in flight holds a copy, not linked yet, of a cluster that
        meets [a, b) (bytes; the lock is held)."""
        cdef Chunk ch
        cdef int64_t cs = self.cs
        cdef int64_t v
        for ch in self.copying:
            if ch.off >= b or ch.off + ch.n <= a:
                continue
            for j in ch.todo:
                v = ch.off + <int64_t>j * cs
                if v < b and a < v + cs:
                    return True
            if ch.ctodo:
                for j in ch.ctodo:
                    v = ch.off + <int64_t>j * cs
                    if v < b and a < v + cs:
                        return True
        return False

    def await_copies(self, int64_t offset, int64_t n):
        """With the image lock held, before a guest write at [offset, offset+n) (bytes):
        wait (the lock released meanwhile) until no copy of a cluster it touches is in
        flight, so that the write finds the pull's cluster linked instead of beating it.
        The copy loop, told of the wait, links its chunks in flight as soon as their
        writes are done (before it waits for bandwidth), so the wait is about one
        chunk's write; a pull that stops gives its chunks back."""
        if not self.overlaps(offset, offset + n):
            return
        self.waiters += 1
        try:
            self.limiter.wake()
            while self.overlaps(offset, offset + n):
                self.linked.wait(0.05)
        finally:
            self.waiters -= 1

    cdef reserve(self, Chunk ch):
        """The chunk's clusters are about to be written (the lock is held)."""
        if ch.todo or ch.ctodo:
            self.copying.append(ch)

    cdef unreserve(self, Chunk ch):
        """The chunk is linked or given back (the lock is held): wake waiting writes."""
        cdef int i
        for i in range(len(self.copying)):
            if self.copying[i] is ch:
                del self.copying[i]
                self.linked.notify_all()
                break

    cdef clear(self):
        """Nothing is in flight any more (the lock is held)."""
        if self.copying:
            self.copying = []
            self.linked.notify_all()


cdef int keep_lacking(Driver top, Flight flight, Chunk ch, bint keep_base,
                      int64_t* skipped) except -1:
    """Of the clusters of ``ch`` read (``ch.runs``, ``ch.state``), keep those ``top``
    still lacks (the lock is held): data to copy (``todo``, host clusters reserved, the
    chunk in ``flight``), zeros to record over a kept base (``zeros``), all-zero
    clusters to leave out (``skips``, their bytes added to ``skipped[0]``); a guest
    write that filled a cluster meanwhile wins. Raises StreamIOError when the tables or
    the space cannot be had."""
    cdef int64_t cs = top.cluster_size
    cdef int64_t off = ch.off, n = ch.n
    cdef int64_t i, j, k, e, v, run
    cdef int kind
    cdef bytearray state = ch.state
    cdef list todo = []       # cluster indexes (within the chunk) to copy, in order
    cdef list zeros = []
    cdef list skips = []
    cdef list ctodo = []      # compressed clusters kept as they are
    for i, k, _n in ch.runs:
        e = i + k
        while i < e:
            v = off + i * cs
            kind, run, _h = top.pull_status(v, min((e - i) * cs, n - i * cs))
            k = min((run + cs - 1) // cs, e - i)
            if kind == KIND_UNALLOC:
                for j in range(i, i + k):
                    if state[j] == 1:
                        todo.append(j)
                    elif state[j] == 3:
                        ctodo.append(j)
                    elif keep_base:
                        zeros.append(j)
                    else:
                        skipped[0] += min(cs, n - j * cs)
                        skips.append(j)
            i += k
    if todo or zeros or ctodo:
        try:
            # tables before data: once the data is written, linking it needs
            # no space (a full disk fails here, before anything is written)
            top.ensure_tables(off, n)
            if todo:
                # an external data file holds each cluster at its guest offset (-1)
                ch.host = -1 if top.external_data else top.alloc_clusters(len(todo))
        except OSError as exc:
            raise StreamIOError(exc, "write", off)
    ch.masks = None
    if todo and top.external_data and isinstance(top, Qcow2ExtData) and \
            (<Qcow2ExtData>top).extended_l2:
        # only the subclusters the top lacks are written: its own lie at the same
        # guest offsets (a guest write to the cluster waits for the link)
        ch.masks = [(<Qcow2ExtData>top).ext_lack_mask((off >> top.cluster_bits) + j)
                    for j in todo]
    ch.todo = todo
    ch.ctodo = ctodo
    flight.reserve(ch)
    ch.zeros = zeros
    ch.skips = skips
    return 0


cdef int cor_group(Driver top, list views, list vaddrs, int64_t cs) except -1:
    """Write a run of whole clusters (``views``, at virtual offsets ``vaddrs``) into fresh
    host clusters and link what the top still lacks (a guest write that came first
    wins; its copy is given back)."""
    cdef int64_t host, i
    if not vaddrs:
        return 0
    if top.external_data and isinstance(top, Qcow2ExtData) and \
            (<Qcow2ExtData>top).extended_l2:
        # subclusters: each cluster's lacking ones written at their guest offsets
        return cor_subclusters(<Qcow2ExtData>top, views, vaddrs, cs)
    if top.external_data:
        # the clusters of a group are consecutive: written at their guest offsets in the
        # data file, each linked to its own offset; a cluster a guest write linked first
        # is in no group (the lock is held from the status to here)
        top.data_file.writev_data(views, vaddrs[0])
        for i in range(len(vaddrs)):
            top.link(vaddrs[i], vaddrs[i])
        return 0
    host = top.alloc_clusters(len(vaddrs))
    i = 0
    try:
        top.file.writev_data(views, host)
        while i < len(vaddrs):
            if not top.link(vaddrs[i], host + i * cs):
                top.free_clusters(host + i * cs, 1)
            i += 1
    except Exception:
        # nothing points at the clusters not linked yet: give them back
        top.free_clusters(host + i * cs, len(vaddrs) - i)
        raise
    return 0


cdef int cor_subclusters(Qcow2ExtData top, list views, list vaddrs, int64_t cs) except -1:
    """``cor_group`` into a top with extended L2 entries and an external data file: of
    each cluster, the subclusters it lacks are written at their guest offsets and
    linked (``views``: a view per cluster, a padding view after a short last one)."""
    cdef int64_t i, vi = 0
    for i in range(len(vaddrs)):
        view = views[vi]
        vi += 1
        if len(view) < cs:
            vi += 1     # the padding of a short last cluster
        top.ext_data_fill(vaddrs[i], view)
    return 0


def copy_on_read(Chain chain, int64_t offset, int64_t n, buf=None, Flight flight=None):
    """Copy the clusters under [offset, offset+n) (bytes) that the top of ``chain``
    still lacks from the chain into the top (the caller holds the image lock).
    ``buf``, when given, holds what the chain reads at [offset, offset+n): the clusters
    it covers whole are written from it without a second read; only partly covered edge
    clusters are read again. All-zero clusters are left where they are (the chain reads
    them cheaply), and so are clusters whose copy by a running pull is in flight
    (``flight``, the pull's; the pull links the same data, a second copy would only be
    given back). Raises OSError on an I/O error (what is linked stays)."""
    cdef Driver top = <Driver>chain.layers[0]
    cdef int64_t cs = top.cluster_size
    cdef int64_t v = offset - offset % cs
    cdef int64_t end = min(offset + n, top.size)
    cdef int64_t run, vc, vend, clen, ustart, uend
    cdef int kind
    cdef bytearray data
    cdef unsigned char[::1] dv
    cdef const unsigned char[::1] src
    cdef const unsigned char* p
    cdef list views, vaddrs
    bmv = None
    top.file.enable_direct()
    if top.data_file is not None:
        top.data_file.enable_direct()
    if buf is not None:
        bmv = memoryview(buf).cast("B")
        src = bmv
    while v < end:
        kind, run, _h = top.block_status(v, end - v)
        if kind != KIND_UNALLOC:
            v += run
            continue
        # a top with subclusters answers by subcluster: the copy covers whole clusters
        # (the top's link keeps the subclusters it has). ``buf`` holds the top's own
        # data too: it serves only clusters wholly inside the top's unallocated run, the
        # others are read from the chain below (a snapshot lacking what the top has
        # takes the chain's data from the copy)
        ustart = v
        uend = v + min(run, end - v)
        vend = uend
        vend += (cs - vend % cs) % cs
        v -= v % cs
        views = []
        vaddrs = []
        vc = v
        while vc < vend:
            clen = min(cs, top.size - vc)
            if flight is not None and flight.overlaps(vc, vc + clen):
                cor_group(top, views, vaddrs, cs)
                views = []
                vaddrs = []
                vc += cs
                continue
            if (bmv is not None and vc >= offset and vc + clen <= offset + n
                    and vc >= ustart and vc + clen <= uend):
                p = &src[vc - offset]
                piece = bmv[vc - offset:vc - offset + clen]
            else:
                data = bytearray(cs)
                dv = data
                chain.c_read(1, vc, &dv[0], clen)
                p = &dv[0]
                piece = data
            if all_zero(p, clen):
                cor_group(top, views, vaddrs, cs)
                views = []
                vaddrs = []
            else:
                views.append(piece)
                if clen < cs:
                    views.append(bytes(cs - clen))
                vaddrs.append(vc)
            vc += cs
        cor_group(top, views, vaddrs, cs)
        views = None
        piece = None
        v = vend


cdef bint write_zero_cluster(Driver top, int64_t v, int64_t n) except -1:
    """Zeros over a kept base, on a format without zero clusters: write ``n`` bytes of
    zero data at ``v`` as a pulled cluster (fresh space, linked), unless a guest write
    got there first; True if written. Raises OSError."""
    kind, run, _h = top.block_status(v, n)
    if kind != KIND_UNALLOC:
        return False
    cor_group(top, [bytes(top.cluster_size)], [v], top.cluster_size)
    return True


cdef int mark_written(bytearray w, list todo, int64_t i, int64_t k, int64_t done,
                      int64_t cs, int64_t n) except -1:
    """Mark in ``w`` (see "What reached the file") the clusters ``todo[i:k]``, laid back
    to back from the start of one write of which ``done`` bytes reached the file, whose
    bytes all did: cluster ``todo[m]`` takes ``cs`` bytes, or the bytes left of a chunk
    of ``n`` bytes when fewer."""
    cdef int64_t m, j
    for m in range(i, k):
        j = todo[m]
        if (m - i) * cs + min(cs, n - j * cs) > done:
            break
        w[j] = 1
    return 0


cdef int host_write(File f, Chunk ch, int64_t cs) except -1:
    """The write of a chunk's copies into the image file ``f`` at the host clusters
    reserved for them: ``ch.views`` (``set_views``: a short last cluster padded to
    ``cs`` bytes) in one vectored write from ``ch.host``. Raises OSError with
    ``written`` (see "What reached the file"; a padded cluster counts once its padding
    reached the file too)."""
    try:
        f.writev_data(ch.views, ch.host)
    except OSError as exc:
        w = bytearray((ch.n + cs - 1) // cs)
        mark_written(w, ch.todo, 0, len(ch.todo), getattr(exc, "bytes_written", 0), cs,
                     INT64_MAX)     # (padded: every cluster takes ``cs`` bytes)
        exc.written = w
        raise
    return 0


def write_at_host(File f, Chunk ch, int64_t cs):
    """On a writer thread: ``host_write`` (the chunk's copies into the image file ``f``
    at ``ch.host``). Raises OSError with ``written`` (see "What reached the file")."""
    host_write(f, ch, cs)


def write_at_guest(File f, Chunk ch, int64_t cs):
    """The write of a chunk's copies into an external data file ``f``: each run of
    consecutive clusters of ``ch.todo`` at its guest offset (``ch.views`` must be set),
    no further than the chunk's end; of a cluster with a mask in ``ch.masks`` (extended
    L2 entries), only the subclusters the mask names. Raises OSError with ``written``
    (see "What reached the file": the runs written before the failing one, and the
    whole clusters of that one that reached the file; a cluster of which only some
    subclusters were written counts as not written)."""
    cdef list todo = ch.todo
    cdef list masks = ch.masks
    cdef int64_t i = 0, k, start, end
    cdef bytearray w = bytearray((ch.n + cs - 1) // cs)
    while i < len(todo):
        k = i
        start = <int64_t>todo[i] * cs
        if masks is not None and <uint64_t>masks[i] != SUB_ALLOC_ALL:
            # a cluster the top holds some subclusters of: only the others
            try:
                write_lacking(f, ch.bmv[start:min(start + cs, ch.n)], ch.off + start,
                              <uint64_t>masks[i], sc_bits_of(cs))
            except OSError as exc:
                exc.written = w
                raise
            w[todo[i]] = 1
            i += 1
            continue
        while k + 1 < len(todo) and todo[k + 1] == todo[k] + 1 and \
                (masks is None or <uint64_t>masks[k + 1] == SUB_ALLOC_ALL):
            k += 1
        end = min((<int64_t>todo[k] + 1) * cs, ch.n)
        try:
            f.writev_data([ch.bmv[start:end]], ch.off + start)
        except OSError as exc:
            mark_written(w, todo, i, k + 1, getattr(exc, "bytes_written", 0), cs, ch.n)
            exc.written = w
            raise
        mark_written(w, todo, i, k + 1, end - start, cs, ch.n)
        i = k + 1
