# cython: language_level=3
"""qcow2 zero writes that allocate what QEMU allocates (docs/formats.md, "Zero writes").

A zero write is cut where QEMU cuts it, at the boundaries of its unit (a subcluster with
extended L2 entries, else a cluster): the unit it covers in part at its start, the
whole units, the unit it covers in part at its end (the disk's last unit counts whole
up to the disk's end). A unit covered in part becomes a zero unit when it is
unallocated or zero and the rest of it already reads zeros by block status (zero or
unallocated down the chain; data that happens to be zero bytes does not count), else
it takes zero data. Whole subclusters take zero bits, except that a compressed cluster
covered in part at either end of them turns them into zero data, 16 MiB at a time,
until what is left can take zero bits.

``ext_write_zeroes`` does it for an image with extended L2 entries;
``zero_unit_whole`` answers for a standard cluster covered in part (the driver,
blockpull._qcow2, then treats it as covered whole).
"""
from libc.stdint cimport int64_t, uint64_t

from blockpull._driver cimport KIND_UNALLOC, KIND_ZERO
from blockpull._q2map cimport COMPRESSED_FLAG
from blockpull._q2sub cimport Qcow2Sub, SUB_ZERO_ALL, sub_mask


# QEMU writes zero data at most this much at a time where zero bits cannot serve
cdef enum:
    ZERO_FALLBACK = 16 << 20


cdef int ext_write_zeroes(Qcow2Sub d, int64_t vaddr, int64_t n, object fill) except -1:
    """Make [vaddr, vaddr+n) of ``d`` (extended L2 entries) read zeros, cut into its
    partly covered first subcluster, its whole subclusters and its partly covered last
    one, each done by ``zero_piece``; ``fill`` reads the chain below (ChainFill)."""
    cdef int64_t scs = 1LL << d.cmap.sc_bits
    cdef int64_t v = vaddr, end = vaddr + n, nxt
    if v & (scs - 1):
        nxt = min(end, (v | (scs - 1)) + 1)
        zero_piece(d, v, nxt, fill)
        v = nxt
    if v < end and (end & (scs - 1)) and end - v > scs:
        zero_piece(d, v, end & ~(scs - 1), fill)
        v = end & ~(scs - 1)
    if v < end:
        zero_piece(d, v, end, fill)
    return 0


cdef int zero_piece(Qcow2Sub d, int64_t v, int64_t end, object fill) except -1:
    """Zeros over [v, end), one piece of ``ext_write_zeroes``: within one subcluster
    it covers in part, a zero subcluster when that one is unallocated or zero and the
    rest of it reads zeros already, else zero data (``ext_write_cluster``); whole
    subclusters take zero bits (``zero_subs``) unless ``zero_refused``: then zero data
    16 MiB at a time."""
    cdef int sb = d.cmap.sc_bits
    cdef int64_t scs = 1LL << sb, cs = d.cluster_size
    cdef int64_t s_at, s_end, nxt
    cdef int s
    cdef uint64_t e, bm
    cdef bytes z
    if (v & (scs - 1)) or ((end & (scs - 1)) and end != d.size):
        d.ext_get(v >> d.cluster_bits, &e, &bm)
        s = <int>((v & (cs - 1)) >> sb)
        s_at = v & ~(scs - 1)
        s_end = min(s_at + scs, d.size)
        if not (e & COMPRESSED_FLAG) and not (bm & (1ULL << s)) and (
                bm & (1ULL << (32 + s)) or (below_zero(fill, s_at, v - s_at)
                                            and below_zero(fill, end, s_end - end))):
            return zero_subs(d, s_at, s_end)
        z = bytes(end - v)
        return d.ext_write_cluster(v >> d.cluster_bits, v & (cs - 1), z, end - v, fill)
    while v < end:
        if not zero_refused(d, v, end):
            return zero_subs(d, v, end)
        nxt = min(end, v + ZERO_FALLBACK)
        z = bytes(nxt - v)
        d.ext_write(v, z, nxt - v, fill)
        v = nxt
    return 0


cdef bint below_zero(object fill, int64_t v, int64_t n) except -1:
    """Whether [v, v+n) reads zeros in the chain below by block status
    (``fill.zeros``); True for an empty range or no chain, False when ``fill`` cannot
    say."""
    if n <= 0 or fill is None:
        return True
    probe = getattr(fill, "zeros", None)
    return probe is not None and bool(probe(v, n))


cdef bint zero_refused(Qcow2Sub d, int64_t v, int64_t end) except -1:
    """Whether zero bits cannot make [v, end) (whole subclusters) read zeros: a
    compressed cluster at either end is covered only in part."""
    cdef int64_t cs = d.cluster_size
    cdef uint64_t e, bm
    if v & (cs - 1):
        d.ext_get(v >> d.cluster_bits, &e, &bm)
        if e & COMPRESSED_FLAG:
            return True
    if (end & (cs - 1)) and end < d.size:
        d.ext_get(end >> d.cluster_bits, &e, &bm)
        if e & COMPRESSED_FLAG:
            return True
    return False


cdef int zero_subs(Qcow2Sub d, int64_t v, int64_t end) except -1:
    """Zero bits (allocated bits cleared) for the whole subclusters of [v, end) (the
    last one up to the disk's end); a cluster covered whole gets a bitmap of zeros only,
    its host cluster kept, a compressed one no host cluster (``zero_refused`` saw to it
    that no compressed cluster is covered in part)."""
    cdef int sb = d.cmap.sc_bits
    cdef int64_t cs = d.cluster_size, scs = 1LL << sb
    cdef int64_t c, nxt, coff, hi
    cdef uint64_t e, bm, zm, newbm
    while v < end:
        c = v >> d.cluster_bits
        nxt = min((c + 1) << d.cluster_bits, end)
        coff = v & (cs - 1)
        hi = coff + (nxt - v)
        d.ext_get(c, &e, &bm)
        if e & COMPRESSED_FLAG:
            d.ext_replace(c, 0, SUB_ZERO_ALL)
        else:
            zm = sub_mask(<int>(coff >> sb), <int>((hi + scs - 1) >> sb))
            newbm = (bm & ~zm) | (zm << 32)
            if newbm != bm:
                d.ext_put(c, e, newbm)
        v = nxt
    return 0


cdef bint zero_unit_whole(int kind, int64_t unit, int64_t unit_end, int64_t v,
                          int64_t end, object fill) except -1:
    """Whether a zero write of [v, end) that covers the standard cluster [unit,
    unit_end) (``unit_end`` at most the disk's end; block status ``kind``) only in part
    may make all of it a zero cluster: it is unallocated or zero and the rest of it
    reads zeros already."""
    if kind == KIND_ZERO:
        return True
    if kind != KIND_UNALLOC:
        return False
    return below_zero(fill, unit, v - unit) and below_zero(fill, end, unit_end - end)
