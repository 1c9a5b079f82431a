# cython: language_level=3
"""A pull that keeps compressed clusters compressed (``compressed="keep"``): which
backing images' compressed clusters go into a qcow2 top as they are (``plan``), the
raw bytes of such a cluster (``KeepPlan.raw``), and where they go in the top
(``Packer``).

A kept cluster's compressed bytes are copied into the top, packed several to a host
cluster as QEMU packs them: the refcount of a host cluster counts each compressed
cluster whose bytes touch it (QEMU's docs/interop/qcow2.rst, "Compressed Clusters
Descriptor" and "Host cluster management"). The bytes are written before the L2 entry
that names them, like any pulled cluster (docs/crash-model.md).
"""
from libc.stdint cimport int64_t, uint64_t

from blockpull._driver cimport Driver
from blockpull._fileio cimport File
from blockpull._q2order cimport Qcow2Ordering
from blockpull._q2compress cimport comp_extent
from blockpull._q2map cimport OFFSET_MASK, COMPRESSED_FLAG
from blockpull._tablecache cimport Table
from blockpull._inflight cimport Chunk, host_write

VALUES = ("inflate", "keep")
_TYPE_NAMES = ("zlib", "zstd")


cdef uint64_t descriptor(int cluster_bits, int64_t coff, int64_t nbytes) noexcept:
    """The L2 entry of a compressed cluster whose ``nbytes`` bytes start at host byte
    ``coff``: the offset in the low 62 - (cluster_bits - 8) bits, then the count of
    512-byte sectors after the first that the bytes touch (QEMU's
    docs/interop/qcow2.rst, "Compressed Clusters Descriptor")."""
    cdef int x = 62 - (cluster_bits - 8)
    cdef uint64_t nsect = ((coff + nbytes - 1) >> 9) - (coff >> 9)
    return COMPRESSED_FLAG | (nsect << x) | <uint64_t>coff


cdef list kept_pieces(Chunk ch):
    """The chunk's kept compressed bytes to write, as (host offset, [bytes, ...]): the
    bytes of the clusters ``ch.ctodo`` in order, those that lie back to back in one
    piece."""
    cdef list out = []
    cdef int64_t i, at, end = -1
    for i in range(len(ch.ctodo)):
        at = ch.cplaces[i]
        data = ch.craw[ch.ctodo[i]]
        if at == end:
            out[len(out) - 1][1].append(data)
        else:
            out.append((at, [data]))
        end = at + len(data)
    return out


def write_kept(File f, Chunk ch, int64_t cs, list pieces):
    """On a writer thread: a chunk's data clusters (``host_write``: ``ch.views`` at
    ``ch.host``), then its kept compressed bytes (``pieces``, from ``kept_pieces``) into
    ``f``, none of them linked yet. Raises OSError with ``written`` (one byte per
    cluster of the chunk, as blockpull._inflight describes it): the data clusters and
    the kept clusters whose bytes all reached the file."""
    cdef int64_t done = 0, left
    if ch.todo:
        host_write(f, ch, cs)
    for at, parts in pieces:
        try:
            f.pwritev(parts, at)
        except OSError as exc:
            left = getattr(exc, "bytes_written", 0)
            for data in parts:
                if len(data) > left:
                    break
                left -= len(data)
                done += 1
            w = bytearray((ch.n + cs - 1) // cs)
            for j in ch.todo:
                w[j] = 1
            for j in ch.ctodo[:done]:
                w[j] = 1
            exc.written = w
            raise
        done += len(parts)


cdef bint _holds_compressed(Qcow2Ordering q) except -1:
    """True when an L2 table of the active view of ``q`` names a compressed cluster (a
    walk of its tables, the image lock held)."""
    cdef int64_t l1i, i, off
    cdef Table t
    cdef int64_t per = q.cmap.l2_entries
    cdef int ext = q.extended_l2
    for l1i in range(q.l1_size):
        off = q.l1.get(l1i) & OFFSET_MASK
        if off == 0:
            continue
        t = q.cmap.load_l2(off)
        for i in range(per):
            if t.get(i << ext) & COMPRESSED_FLAG:
                return True
    return False


cdef class KeepPlan:
    """What a pull does with the compressed clusters of its backing images: ``mode``
    "keep" (copied compressed, of type ``ctype``, from the chain depths that allow it)
    or "inflate", and ``reason``, a sentence saying why (shown in the job's info)."""

    def __init__(self, str mode, str reason, int ctype=-1, bint switch=False,
                 eligible=None, int64_t cs=0):
        self.mode = mode
        self.reason = reason
        self.ctype = ctype
        self.switch = switch
        self.eligible = bytearray(eligible or b"")
        self.cs = cs

    cdef File extent(self, Driver d, int depth, int64_t vaddr, int64_t* coff,
                     int64_t* clen):
        """Where the compressed bytes of the cluster at ``vaddr`` (bytes) of layer ``d``
        at chain depth ``depth`` lie when they are to be kept: the file holding them,
        their host offset in ``coff[0]`` and their length in ``clen[0]`` (bytes): the
        bytes the descriptor names, at most one cluster of them (a longer one is
        inflated, so that its new descriptor always fits). None when the cluster is read
        and inflated as usual."""
        cdef Qcow2Ordering q
        cdef uint64_t e, off, n
        if depth >= len(self.eligible) or not self.eligible[depth]:
            return None
        q = <Qcow2Ordering>d
        e = q.cmap.l2_entry(vaddr >> q.cluster_bits)
        if not (e & COMPRESSED_FLAG):
            return None
        comp_extent(e, q.cluster_bits, &off, &n)
        if off >= <uint64_t>q.rc.file_size:
            return None       # the read reports it
        n = min(n, q.rc.file_size - off)
        if n > <uint64_t>self.cs:
            return None
        coff[0] = off
        clen[0] = n
        return q.file

    def apply(self, top):
        """Set the top's compression type when the plan needs it (the image lock held),
        durably, before any cluster of that type is linked: an image without compressed
        clusters reads the same under either type, so a crash on either side of the
        write leaves a valid image. Raises OSError."""
        cdef Qcow2Ordering q
        if self.mode != "keep" or not self.switch:
            return
        q = <Qcow2Ordering?>top
        q.header.write_compression_type(q.file, self.ctype)
        q.sync_all()
        q.compression_type = self.ctype
        q.incompatible = q.header.incompatible
        q.cmap.compression_type = self.ctype
        q.cmap.decomp = None
        q.cmap.last_comp_vcluster = -1
        self.switch = False


def plan(chain, Driver top, int base_depth, str compressed):
    """The KeepPlan of a pull of ``chain`` (a blockpull._chain.Chain whose top is
    ``top``) down to depth ``base_depth``, under ``compressed`` ("inflate" or "keep").
    The top keeps a backing image's compressed clusters when both are qcow2 with the
    same cluster size and the top's compression type is the backing's, or can be set
    to it (the top holds no compressed cluster; zstd needs a v3 header of at least
    112 bytes); a top with extended L2 entries, internal snapshots or an external data
    file, and a QED top, inflate. The tables of the top and of the backing images are read (the image lock
    is held). Raises ValueError for another ``compressed``, OSError."""
    cdef Qcow2Ordering q
    if compressed not in VALUES:
        raise ValueError("compressed must be 'inflate' or 'keep', not %r" % (compressed,))
    if compressed == "inflate":
        return KeepPlan("inflate", "compressed clusters are inflated (the default)")
    if not isinstance(top, Qcow2Ordering):
        return KeepPlan("inflate", "a %s top holds no compressed clusters: they are "
                        "inflated" % top.format)
    q = <Qcow2Ordering>top
    if q.extended_l2:
        return KeepPlan("inflate", "the top has extended L2 entries: compressed clusters "
                        "are inflated")
    if q.nb_snapshots:
        return KeepPlan("inflate", "the top has internal snapshots: compressed clusters "
                        "are inflated")
    if q.external_data:
        return KeepPlan("inflate", "the top has an external data file, which holds no "
                        "compressed clusters: they are inflated")
    layers = chain.layers
    holders = []
    for d in range(1, min(base_depth, len(layers))):
        if (<Driver>layers[d]).format == "qcow2" and _holds_compressed(<Qcow2Ordering>layers[d]):
            holders.append(d)
    if not holders:
        return KeepPlan("inflate", "no backing image above the base holds compressed "
                        "clusters")
    same = [d for d in holders if (<Driver>layers[d]).cluster_size == top.cluster_size]
    if not same:
        return KeepPlan("inflate", "no backing image above the base with compressed "
                        "clusters has the top's cluster size (%d bytes): they are inflated"
                        % top.cluster_size)
    types = {(<Qcow2Ordering>layers[d]).compression_type for d in same}
    ctype = q.compression_type
    switch = False
    if ctype not in types:
        want = (<Qcow2Ordering>layers[same[len(same) - 1]]).compression_type
        if _holds_compressed(q):
            return KeepPlan("inflate", "the top already holds %s compressed clusters and "
                            "the backing's are %s: they are inflated"
                            % (_TYPE_NAMES[ctype], "/".join(sorted(_TYPE_NAMES[t] for t in types))))
        if q.version != 3 or q.header_length < 112:
            return KeepPlan("inflate", "the top's header cannot name compression type %s "
                            "(it needs qcow2 v3 with a 112-byte header): compressed "
                            "clusters are inflated" % _TYPE_NAMES[want])
        ctype, switch = want, (want != q.compression_type)
    eligible = bytearray(len(layers))
    for d in same:
        if (<Qcow2Ordering>layers[d]).compression_type == ctype:
            eligible[d] = 1
    reason = "%s compressed clusters are kept compressed" % _TYPE_NAMES[ctype]
    if len(types) > 1:
        reason += "; those of the other compression type are inflated"
    if len(same) < len(holders):
        reason += "; those of backing images of another cluster size are inflated"
    return KeepPlan("keep", reason, ctype, switch, eligible, top.cluster_size)


cdef class Packer:
    """Places compressed bytes in the top, packed into host clusters. While it packs into
    a cluster it holds one count on it (given back by ``release``), so that the cluster
    is never freed and handed out again while more bytes may go into it (with 1-bit
    refcounts it packs nothing and holds none)."""

    def __init__(self, Qcow2Ordering top):
        self.top = top
        self.cur = 0
        self.end = 0

    cdef int64_t place(self, int64_t nbytes) except -1:
        """Host byte offset for ``nbytes`` compressed bytes (at most one cluster, as
        ``KeepPlan.extent`` keeps them; the lock is held), counted:
        each host cluster they touch gets one more reference. Bytes that do not fit in
        the packing cluster go on into the next clusters when those are the ones
        allocated next, as QEMU packs them (its ``qcow2_alloc_bytes``); else they start
        a new cluster. So do bytes for a packing cluster whose count is at the top's
        refcount maximum (``refcount_bits`` wide: 1 with 1-bit counts, where nothing is
        packed and no cluster held). Raises OSError when the space cannot be had."""
        cdef Qcow2Ordering top = self.top
        cdef int cb = top.cluster_bits
        cdef int64_t cs = top.cluster_size
        cdef int64_t coff, k, more, room
        if self.cur and top.rc.get((self.end - 1) >> cb) >= top.rc.rc_max:
            self.release()                # it counts all it can: pack no more into it
        room = self.end - self.cur if self.cur else 0
        if self.cur and room >= nbytes:
            coff = self.cur
            top.rc.add(coff >> cb, 1)
            self.cur += nbytes
            return coff
        k = (nbytes - room + cs - 1) // cs
        more = top.alloc_clusters(k)      # counted once each: these bytes touch them all
        if room and more == self.end:
            coff = self.cur               # straddles: its head is in the packing cluster
            top.rc.add(coff >> cb, 1)
        else:
            coff = more                   # k >= 1 clusters hold nbytes <= one cluster
        self.release()
        self.cur = coff + nbytes
        self.end = more + k * cs
        if self.cur < self.end and top.rc.rc_max > 1:
            top.rc.add((self.end - 1) >> cb, 1)    # the packer's hold
        else:
            self.cur = self.end = 0
        return coff

    cdef int place_chunk(self, Chunk ch) except -1:
        """Place the compressed bytes of the chunk's kept clusters (``ch.ctodo``, bytes in
        ``ch.craw``) into ``ch.cplaces`` (the lock is held). Raises OSError when the space
        cannot be had; ``ch.ctodo`` then holds the clusters placed so far."""
        cdef list places = []
        ch.cplaces = places
        ch.cdone = 0
        try:
            for j in ch.ctodo:
                places.append(self.place(len(ch.craw[j])))
        except OSError:
            del ch.ctodo[len(places):]
            raise
        return 0

    cdef int give_back_chunk(self, Chunk ch) except -1:
        """The chunk's placed bytes not linked yet (``ch.cplaces[ch.cdone:]``) will not
        be: drop their counts."""
        cdef int64_t i
        for i in range(ch.cdone, len(ch.cplaces)):
            self.give_back(ch.cplaces[i], len(ch.craw[ch.ctodo[i]]))
        return 0

    cdef int give_back_from(self, Chunk ch, int64_t first) except -1:
        """The chunk's kept clusters from index ``first`` on (in the chunk) will not be
        linked: drop their counts and their places (none is linked yet)."""
        cdef int64_t i = 0
        if not ch.ctodo:
            return 0
        while i < len(ch.ctodo) and ch.ctodo[i] < first:
            i += 1
        for j in range(i, len(ch.cplaces)):
            self.give_back(ch.cplaces[j], len(ch.craw[ch.ctodo[j]]))
        del ch.ctodo[i:]
        del ch.cplaces[i:]
        return 0

    cdef int give_back(self, int64_t coff, int64_t nbytes) except -1:
        """The bytes placed at ``coff`` will not be linked: drop their counts."""
        cdef int cb = self.top.cluster_bits
        cdef int64_t c
        for c in range(coff >> cb, ((coff + nbytes - 1) >> cb) + 1):
            self.top.rc.add(c, -1)
        self.top.rc.trim_tail()
        return 0

    cdef int release(self) except -1:
        """Stop packing into the current cluster: its hold is dropped (the lock is
        held)."""
        cdef int64_t c
        if self.cur:
            c = (self.end - 1) >> self.top.cluster_bits
            self.cur = self.end = 0
            self.top.rc.add(c, -1)
            self.top.rc.trim_tail()
        return 0

    def close(self):
        """The pass is over: release the packing cluster."""
        self.release()
