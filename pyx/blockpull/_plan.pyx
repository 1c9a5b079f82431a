# cython: language_level=3
"""What a pull must fill: runs of the top that it lacks and that the chain above the base
holds (a walk of the metadata, no data read)."""
from libc.stdint cimport int64_t

from blockpull._chain cimport Chain
from blockpull._driver cimport Driver, KIND_UNALLOC, KIND_ZERO


cdef class Planner:
    """The runs a pull of ``chain`` down to chain index ``base_depth`` (the chain's depth:
    no base) must fill in its top. Callers hold the image lock."""

    def __init__(self, Chain chain, int base_depth):
        self.chain = chain
        self.top = <Driver>chain.layers[0]
        self.base_depth = base_depth
        self.keep_base = base_depth < chain.depth

    cdef bint hidden(self, int64_t q):
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
                    inc = self.keep_base and self.hidden(q)
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


cdef list lacking(Driver top, int64_t off, int64_t n):
    """(first cluster, clusters, bytes) of each run of the chunk [off, off+n) (bytes,
    ``off`` cluster aligned) that ``top`` lacks (the lock is held)."""
    cdef int64_t cs = top.cluster_size
    cdef int64_t ncl = (n + cs - 1) // cs
    cdef int64_t i = 0, v, k, run
    cdef int kind
    cdef list runs = []
    while i < ncl:
        v = off + i * cs
        kind, run, _h = top.pull_status(v, n - i * cs)
        k = (run + cs - 1) // cs
        if kind == KIND_UNALLOC:
            runs.append((i, min(k, ncl - i), min(run, n - i * cs)))
        i += k
    return runs
