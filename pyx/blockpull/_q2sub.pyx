# cython: language_level=3
"""qcow2 extended L2 entries in a writable image: allocation per subcluster (QEMU's
docs/interop/qcow2.rst, "Extended L2 Entries").

With incompatible bit 4 an L2 entry is 128 bits: the standard 64-bit entry (host offset,
COPIED, COMPRESSED; bit 0 reserved) and a 64-bit bitmap over the cluster's 32
subclusters, bit x "allocated" (data at host offset + x subclusters), bit 32 + x "reads
as zeros"; both set is invalid, a compressed entry has a bitmap of 0 and every
subcluster allocated, and an entry without a host offset has no allocated subcluster.

``Qcow2Sub`` is the base of the qcow2 driver (blockpull._qcow2.Qcow2) that holds these
paths; the driver sends writes, links, zero writes and the pull's status here when the
image has extended L2 entries:

- a guest write into a cluster with a host offset of its own touches only the
  subclusters it covers, a partly covered one filled from what reads there now (the
  image's own data, zeros, or the chain below through ``fill``); a cluster without one
  (none, or shared with a snapshot) gets a new host cluster written, as by QEMU, from
  the first to the last of the written and the old allocated subclusters, each filled
  likewise; a write into a compressed cluster rewrites it whole, every subcluster
  allocated;
- a pull or copy-on-read links a cluster that lacks some subclusters: the new host
  cluster takes the top's own allocated subclusters (copied from where they are) and the
  chain's data for the ones it lacked; zero subclusters stay zero. The top's data is
  never replaced by the backing's;
- zero writes (blockpull._q2zero) set the zero bits (and clear the allocated ones) of
  whole subclusters, and of a partly covered one that is unallocated or zero where the
  rest of it reads zeros already; other partly covered ones take zero data, as QEMU's;
- with internal snapshots a cluster whose count is not 1 (shared with a snapshot) is
  never written in place, and a pull or copy-on-read fills every view that lacks
  subclusters (``ext_link_views``; see the section below).

The crash order is the driver's (docs/crash-model.md): data is written into space no
entry marks allocated, and the 128-bit entry that names it (one unit of its L2 table)
is written at the next flush point, after the sync that makes the data durable.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

from blockpull._driver cimport KIND_UNALLOC, KIND_DATA, KIND_COMPRESSED
from blockpull._q2map cimport OFFSET_MASK, COPIED, COMPRESSED_FLAG


cdef inline int sub_first(uint64_t mask) noexcept:
    """The lowest bit set in ``mask`` (not 0)."""
    cdef int s = 0
    while not (mask >> s) & 1:
        s += 1
    return s


cdef inline int sub_last(uint64_t mask) noexcept:
    """The highest bit set in ``mask`` (not 0)."""
    cdef int s = 63
    while not (mask >> s) & 1:
        s -= 1
    return s


cdef class Qcow2Sub(Qcow2Ordering):
    """The subcluster paths of the qcow2 driver (see the module docstring); not opened
    on its own: ``blockpull._qcow2.Qcow2`` is the driver and gives the primitives."""

    cdef Table _l2_for_write(self, int64_t l1i):
        raise NotImplementedError

    cdef int _bound_dirty(self) except -1:
        raise NotImplementedError

    cdef _bitmaps_mark(self, int64_t vaddr, int64_t n):
        raise NotImplementedError

    # ---- entries ----------------------------------------------------------------------

    cdef int ext_get(self, int64_t c, uint64_t* e, uint64_t* bm) except -1:
        """The entry and bitmap of virtual cluster ``c`` (0, 0 where no table holds it).
        Raises ImageFormatError for an entry reads refuse too (a bitmap marking a
        subcluster both allocated and zero, allocated subclusters without a host offset,
        a host offset unaligned or past the end of the file, or with an external data
        file not the cluster's guest offset): writes, pulls and copy-on-read never build
        on it."""
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t i = c & (self.l2_entries - 1)
        cdef int64_t off, host
        cdef bint hosted
        cdef Table t
        e[0] = 0
        bm[0] = 0
        if l1i >= self.l1_size:
            return 0
        off = self.l1.get(l1i) & OFFSET_MASK
        if off == 0:
            return 0
        t = self.cmap.load_l2(off)
        if self.external_data:                  # the checks every read makes
            self.cmap.unit_ext(t, c, i, 0, &hosted)
        else:
            self.cmap.unit(t, c, i, 0, &host)
        e[0] = t.get(2 * i)
        bm[0] = t.get(2 * i + 1)
        return 0

    cdef int ext_put(self, int64_t c, uint64_t e, uint64_t bm) except -1:
        """Set the 128-bit entry of cluster ``c`` (written with its table)."""
        cdef Table t = self._l2_for_write(c >> self.l2_bits)
        cdef int64_t i = c & (self.l2_entries - 1)
        t.put(2 * i, e)
        t.put(2 * i + 1, bm)
        return 0

    cdef int ext_replace(self, int64_t c, uint64_t e, uint64_t bm) except -1:
        """Point cluster ``c`` at a new entry, dropping the reference the old one held
        when it named other host clusters."""
        cdef Table t = self._l2_for_write(c >> self.l2_bits)
        cdef int64_t i = c & (self.l2_entries - 1)
        cdef uint64_t old = t.get(2 * i)
        t.put(2 * i, e)
        t.put(2 * i + 1, bm)
        if (old & COMPRESSED_FLAG) or (old & OFFSET_MASK) != (e & OFFSET_MASK):
            drop = self._held_by(old)
            if drop is not None:
                self._drop_ref(drop[0], drop[1])
        if old & COMPRESSED_FLAG and c == self.cmap.last_comp_vcluster:
            self.cmap.last_comp_vcluster = -1
        return 0

    cdef _unlink_fresh(self, int64_t c, int64_t host, object old):
        """Undo, after a failed sync, a change of cluster ``c`` whose data at ``host``
        may be lost: the entry and bitmap ``old`` it replaced come back (a new host
        cluster is given back; subclusters allocated in place are unallocated again)."""
        cdef uint64_t e, bm, olde, oldbm, later
        cdef Table t
        if not self.extended_l2:
            Qcow2Ordering._unlink_fresh(self, c, host, old)
            return
        if type(old) is list:
            self.ext_unlink_views(c, old)     # a link into the snapshots' views too
            return
        self.ext_get(c, &e, &bm)
        if (e & OFFSET_MASK) != <uint64_t>host:
            return
        olde, oldbm = old
        if not (olde & COMPRESSED_FLAG):
            # zero bits set since (a later zero write) stay: those subclusters must not
            # read again what the old entry held there
            later = bm & SUB_ZERO_ALL & ~oldbm
            oldbm = (oldbm & ~(later >> 32)) | later
        t = self.cmap.load_l2(self.l1.get(c >> self.l2_bits) & OFFSET_MASK)
        t.put(2 * (c & (self.l2_entries - 1)), olde)
        t.put(2 * (c & (self.l2_entries - 1)) + 1, oldbm)
        if (olde & OFFSET_MASK) == <uint64_t>host:
            return
        self.rc.add(host >> self.cluster_bits, -1)
        drop = self._held_by(olde)
        if drop is not None:
            for lst in (self.free_waiting, self.free_after_sync):
                if drop in lst:
                    lst.remove(drop)
                    break

    # ---- guest writes -----------------------------------------------------------------

    cdef int ext_sub_content(self, int64_t c, int sub, uint64_t e, uint64_t bm,
                             bytearray buf, int64_t at, object fill) except -1:
        """What subcluster ``sub`` of cluster ``c`` reads now, into ``buf[at:]`` (one
        subcluster): zeros, the image's data, or the chain below (``fill``)."""
        cdef int sb = self.cmap.sc_bits
        cdef int64_t scs = 1LL << sb
        cdef int64_t vs = (c << self.cluster_bits) + (<int64_t>sub << sb)
        cdef int64_t want
        cdef unsigned char* p = buf
        if bm & (1ULL << (32 + sub)):
            memset(p + at, 0, scs)
        elif bm & (1ULL << sub):
            self.file.read_full(p + at, scs, (e & OFFSET_MASK) + (<int64_t>sub << sb))
        else:
            memset(p + at, 0, scs)
            want = min(scs, self.size - vs)
            if fill is not None and want > 0:
                fill(vs, memoryview(buf)[at:at + want])
        return 0

    cdef int ext_write(self, int64_t vaddr, const unsigned char* src, int64_t n,
                       object fill) except -1:
        """A guest write of ``n`` bytes at ``vaddr`` (checked by the caller)."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t pos = 0, v, coff, take, k
        while pos < n:
            v = vaddr + pos
            coff = v & (cs - 1)
            take = min(cs - coff, n - pos)
            if take == cs:
                k = self.ext_fresh_run(v >> self.cluster_bits, (n - pos) // cs)
                if k:
                    self.ext_write_run(v >> self.cluster_bits, src + pos, k)
                    pos += k * cs
                    continue
            self.ext_write_cluster(v >> self.cluster_bits, coff, src + pos, take, fill)
            pos += take
        return 0

    cdef int64_t ext_fresh_run(self, int64_t c, int64_t most) except -1:
        """How many clusters from ``c`` on (at most ``most``, at most 256) have no host
        cluster and are not compressed: a write covering them whole keeps nothing of
        theirs and fills them in one run of new host clusters."""
        cdef uint64_t e, bm
        cdef int64_t k = 0
        most = min(most, 256)
        while k < most:
            self.ext_get(c + k, &e, &bm)
            if e & (OFFSET_MASK | COMPRESSED_FLAG):
                break
            k += 1
        return k

    cdef int ext_write_run(self, int64_t c, const unsigned char* src, int64_t k) except -1:
        """Write ``k`` whole clusters from ``c`` on (none has a host cluster) into a run of
        new host clusters, every subcluster allocated."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t host, i = 0
        cdef uint64_t e, bm
        self.ensure_tables(c << self.cluster_bits, k * cs)     # tables before data
        for i in range(c >> self.l2_bits, ((c + k - 1) >> self.l2_bits) + 1):
            self._l2_for_write(i)                              # then the clusters
        i = 0
        host = self.alloc_clusters(k)
        try:
            self.guest_dirty = True
            self.file.write_full(src, k * cs, host)
            while i < k:
                self.ext_get(c + i, &e, &bm)
                self.ext_replace(c + i, <uint64_t>(host + i * cs) | COPIED, SUB_ALLOC_ALL)
                self.fresh.append((c + i, host + i * cs, (e, bm)))
                i += 1
        except Exception:
            # nothing points at the clusters not linked yet: give them back
            self.free_clusters(host + i * cs, k - i)
            raise
        return 0

    cdef int ext_write_cluster(self, int64_t c, int64_t coff, const unsigned char* src,
                               int64_t n, object fill) except -1:
        """Write ``n`` bytes at byte ``coff`` of cluster ``c``: in place when the cluster
        has a host offset of its own (only the subclusters the write touches, partly
        covered ones filled from what they read now), else into a new host cluster
        whose written span runs, as QEMU's copy-on-write does, from the first of the
        write's and the old allocated subclusters to the last of them, every subcluster
        in it filled from what it reads now (own data, zeros or the chain) and
        allocated (docs/formats.md, "Extended L2")."""
        cdef int sb = self.cmap.sc_bits
        cdef uint64_t e, bm, span, newbm, off
        cdef int s0, s1
        cdef int64_t a
        cdef bytearray buf
        cdef unsigned char* p
        cdef bint inplace
        self.ext_get(c, &e, &bm)
        if e & COMPRESSED_FLAG:
            return self.ext_rewrite_compressed(c, coff, src, n, e, bm)
        off = e & OFFSET_MASK
        inplace = off and (e & COPIED or self.rc.get(off >> self.cluster_bits) == 1)
        s0 = <int>(coff >> sb)
        s1 = <int>((coff + n - 1) >> sb)
        if not inplace and bm & SUB_ALLOC_ALL:
            s0 = min(s0, sub_first(bm & SUB_ALLOC_ALL))
            s1 = max(s1, sub_last(bm & SUB_ALLOC_ALL))
        a = <int64_t>s0 << sb
        span = sub_mask(s0, s1 + 1)
        buf = self.ext_span_buffer(c, s0, s1, coff, src, n, e, bm, fill)
        p = buf
        newbm = (bm | span) & ~(span << 32)
        if inplace:
            self.guest_dirty = True
            self.file.write_full(p, len(buf), off + a)
            if (bm & span) != span:
                # subclusters allocated in place: undone if a sync loses their data
                self.fresh.append((c, <int64_t>off, (e, bm)))
            if newbm != bm or not (e & COPIED):
                self.ext_put(c, e | COPIED, newbm)
            return 0
        return self.ext_new_cluster(c, p, a, len(buf), e, bm, newbm)

    cdef int ext_new_cluster(self, int64_t c, const unsigned char* p, int64_t at,
                             int64_t n, uint64_t e, uint64_t bm, uint64_t newbm) except -1:
        """Write the ``n`` bytes at ``p`` at byte ``at`` of a new host cluster and point
        cluster ``c`` (entry ``e``, bitmap ``bm``) at it with bitmap ``newbm``: its L2
        table is made writable before the cluster is allocated (as QEMU orders them),
        the cluster is given back if the write fails, and the link is undone if a sync
        loses the data (``fresh``)."""
        cdef int64_t host
        self.ensure_tables(c << self.cluster_bits, self.cluster_size)   # tables before data
        self._l2_for_write(c >> self.l2_bits)
        host = self.alloc_clusters(1)
        try:
            self.guest_dirty = True
            self.file.write_full(p, n, host + at)
            self.ext_replace(c, <uint64_t>host | COPIED, newbm)
        except Exception:
            # nothing points at the new cluster yet: give it back
            self.free_clusters(host, 1)
            raise
        self.fresh.append((c, host, (e, bm)))
        return 0

    cdef bytearray ext_span_buffer(self, int64_t c, int s0, int s1, int64_t coff,
                                   const unsigned char* src, int64_t n, uint64_t e,
                                   uint64_t bm, object fill):
        """Subclusters ``s0`` .. ``s1`` of cluster ``c`` with the ``n`` bytes of ``src``
        at byte ``coff`` of the cluster written over them: each one the write does not
        cover whole holds what it reads now."""
        cdef int sb = self.cmap.sc_bits
        cdef int64_t scs = 1LL << sb
        cdef int64_t a = <int64_t>s0 << sb
        cdef bytearray buf = bytearray(((<int64_t>s1 + 1) << sb) - a)
        cdef unsigned char* p = buf
        cdef int s
        for s in range(s0, s1 + 1):
            if (<int64_t>s << sb) < coff or ((<int64_t>s + 1) << sb) > coff + n:
                self.ext_sub_content(c, s, e, bm, buf, (<int64_t>s << sb) - a, fill)
        memcpy(p + (coff - a), src, n)
        return buf

    cdef int ext_rewrite_compressed(self, int64_t c, int64_t coff,
                                    const unsigned char* src, int64_t n,
                                    uint64_t e, uint64_t bm) except -1:
        """A write into compressed cluster ``c``: the cluster is rewritten whole into a
        new host cluster, every subcluster allocated (a compressed entry's bitmap is 0;
        QEMU's docs/interop/qcow2.rst, "Extended L2 Entries")."""
        cdef int64_t cs = self.cluster_size
        cdef bytearray buf = bytearray(cs)
        cdef unsigned char* p = buf
        self.cmap.read_layer(c << self.cluster_bits, p, cs, KIND_COMPRESSED, 0)
        memcpy(p + coff, src, n)
        return self.ext_new_cluster(c, p, 0, cs, e, bm, SUB_ALLOC_ALL)

    cdef int ext_copy_subs(self, uint64_t mask, int64_t src_host, int64_t dst_host) except -1:
        """Copy the subclusters set in ``mask`` from host cluster ``src_host`` to the
        same places in ``dst_host`` (runs of them in one read and write each)."""
        cdef int sb = self.cmap.sc_bits
        cdef int s = 0, t
        cdef int64_t at, ln
        cdef bytearray buf
        cdef unsigned char* p
        while True:
            s = mask_run(mask, s, &t)
            if s == 32:
                break
            at = <int64_t>s << sb
            ln = <int64_t>(t - s) << sb
            buf = bytearray(ln)
            p = buf
            self.file.read_full(p, ln, src_host + at)
            self.file.write_full(p, ln, dst_host + at)
            s = t
        return 0

    # ---- pulls and copy-on-read -----------------------------------------------------

    cdef bint ext_lacks(self, int64_t c) except -1:
        """Whether cluster ``c`` has a subcluster neither allocated nor zero, in the
        active view or in any internal snapshot's (a pull fills the snapshots too)."""
        cdef uint64_t e, bm
        self.ext_get(c, &e, &bm)
        if not (e & COMPRESSED_FLAG) and (~(bm | (bm >> 32)) & SUB_ALLOC_ALL) != 0:
            return True
        return len(self.snaps.l1s) > 0 and self.snaps.lacks(c)

    cdef tuple ext_pull_status(self, int64_t vaddr, int64_t n):
        """The pull's view, by whole clusters: KIND_UNALLOC for a run of clusters each
        lacking some subcluster (the pull fills those), KIND_DATA for a run of complete
        ones; (kind, length in bytes, 0)."""
        cdef int64_t end = min(vaddr + n, self.size)
        cdef int64_t c = vaddr >> self.cluster_bits, i, l1i
        cdef bint first
        if vaddr >= self.size:
            return (KIND_UNALLOC, n, 0)
        first = self.ext_lacks(c)
        i = c + 1
        while (i << self.cluster_bits) < end:
            l1i = i >> self.l2_bits
            if l1i >= self.l1_size or (self.l1.get(l1i) & OFFSET_MASK) == 0:
                if not first:
                    break
                i = (l1i + 1) << self.l2_bits     # a whole L2 range lacks everything
                continue
            if self.ext_lacks(i) != first:
                break
            i += 1
        return (KIND_UNALLOC if first else KIND_DATA,
                min(i << self.cluster_bits, end) - vaddr, 0)

    cdef bint ext_link(self, int64_t vaddr, int64_t host) except -1:
        """Link the copy at ``host`` (the chain's data for the whole cluster) for the
        subclusters the cluster at ``vaddr`` lacks: the subclusters the image has
        allocated are copied into ``host`` first and keep their data, zero ones stay
        zero. False when the cluster lacks nothing (the copy is the caller's to give
        back)."""
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef uint64_t e, bm, lack, have, off
        self._bound_dirty()
        if self.snaps.l1s:
            return self.ext_link_views(c, host)
        self.ext_get(c, &e, &bm)
        if e & COMPRESSED_FLAG:
            return False
        lack = ~(bm | (bm >> 32)) & SUB_ALLOC_ALL
        if lack == 0:
            return False
        off = e & OFFSET_MASK
        have = bm & SUB_ALLOC_ALL
        if off and have:
            self.ext_copy_subs(have, off, host)
        self.ext_replace(c, <uint64_t>host | COPIED, (bm & SUB_ZERO_ALL) | have | lack)
        self.fresh.append((c, host, (e, bm)))
        return True

    cdef bint ext_link_zero(self, int64_t vaddr) except -1:
        """Mark the subclusters the cluster at ``vaddr`` lacks as zeros; False when it
        lacks none."""
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef uint64_t e, bm, lack
        self._bound_dirty()
        if self.snaps.l1s:
            return self.ext_link_zero_views(c)
        self.ext_get(c, &e, &bm)
        if e & COMPRESSED_FLAG:
            return False
        lack = ~(bm | (bm >> 32)) & SUB_ALLOC_ALL
        if lack == 0:
            return False
        self.ext_put(c, e, bm | (lack << 32))
        return True

    # ---- internal snapshots ---------------------------------------------------------
    # A snapshot's subclusters that are neither allocated nor zero read the backing
    # chain, like the active view's: a pull fills them too. Each L2 table (a table is
    # shared by the views whose L1 entries name it) takes its new entry in place, since
    # every view sharing it lacks the same subclusters; a data cluster is counted once
    # per view that names it (QEMU's docs/interop/qcow2.rst, "Snapshots").

    cdef bint ext_link_views(self, int64_t c, int64_t host) except -1:
        """``ext_link`` on an image with internal snapshots: every view lacking some
        subclusters of cluster ``c`` gets them from the chain's copy at ``host``, its
        own allocated subclusters kept and its zero ones left zero. A view with none of
        its own takes ``host`` itself (shared, counted once per view); one with some
        takes a new host cluster (the copy's lacking subclusters and its own), one per
        distinct old data. The active view, when it lacks nothing but shares a cluster
        that a lacking view leaves, moves to a copy of its own too (``ext_move_active``).
        Clusters are allocated before any entry changes, so a full disk changes
        nothing."""
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t nh, off
        cdef uint64_t e, bm, lack, have
        cdef Table t
        self.ensure_tables(c << self.cluster_bits, self.cluster_size)  # every view's table
        todo = []          # (table offset, views, e, bm, lack, have, key)
        targets = {}       # key -> [host cluster, references]
        tables = self.view_tables(c >> self.l2_bits)
        for off, views in tables:
            t = self.cmap.load_l2(off)
            e = t.get(2 * i2)
            bm = t.get(2 * i2 + 1)
            lack = ~(bm | (bm >> 32)) & SUB_ALLOC_ALL
            if (e & COMPRESSED_FLAG) or lack == 0:
                continue
            have = bm & SUB_ALLOC_ALL
            key = (e & OFFSET_MASK, have) if (e & OFFSET_MASK) and have else None
            todo.append((off, views, e, bm, lack, have, key))
            targets.setdefault(key, [-1, 0])[1] += self.snaps.l2_refs.get(off, 1)
        if not todo:
            return False
        if None not in targets:
            targets[todo[0][6]][0] = host     # the first view with data of its own
        else:
            targets[None][0] = host
        self.ext_move_active(c, tables, todo, targets)
        made = []
        try:
            for key, tg in targets.items():
                if tg[0] < 0:
                    nh = self.alloc_clusters(1)
                    made.append(nh)
                    tg[0] = nh
                    if len(key) == 2:
                        self.ext_copy_subs(SUB_ALLOC_ALL, host, nh)
            # then each view's own subclusters over its copy (once per distinct data)
            for key in targets:
                if key is not None:
                    self.ext_copy_subs(key[1], key[0], targets[key][0])
        except Exception:
            for nh in made:
                self.free_clusters(nh, 1)
            raise
        return self.ext_put_views(c, todo, targets)

    cdef int ext_move_active(self, int64_t c, list tables, list todo, dict targets) except -1:
        """When the active view lacks nothing of cluster ``c`` but names a host cluster
        that a lacking view leaves, add to ``todo`` a move of the active entry to a new
        cluster holding its allocated subclusters (bitmap unchanged): the cluster it
        named must never stay named by the active view with a count of 1 and no COPIED
        bit (QEMU's docs/interop/qcow2.rst, "Cluster mapping", bit 63), a state that
        the counts and the tables, written at different flush steps, cannot reach at
        once."""
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t off
        cdef uint64_t e, bm, x
        cdef Table t
        if not tables or 0 not in tables[0][1]:
            return 0
        off, views = tables[0]
        for td in todo:
            if td[0] == off:
                return 0              # it lacks subclusters itself: linked like the rest
        t = self.cmap.load_l2(off)
        e = t.get(2 * i2)
        bm = t.get(2 * i2 + 1)
        x = e & OFFSET_MASK
        if x == 0 or (e & COMPRESSED_FLAG):
            return 0
        for td in todo:
            if (<uint64_t>td[2] & OFFSET_MASK) == x:
                key = (x, bm & SUB_ALLOC_ALL, "move")
                todo.append((off, views, e, bm, 0, bm & SUB_ALLOC_ALL, key))
                # with no allocated subcluster it names no cluster at all (offset 0)
                targets[key] = [-1 if bm & SUB_ALLOC_ALL else 0,
                                self.snaps.l2_refs.get(off, 1)]
                return 0
        return 0

    cdef bint ext_put_views(self, int64_t c, list todo, dict targets) except -1:
        """The entries of ``ext_link_views`` (data in place): each table's new entry,
        the counts (one per view naming a cluster; COPIED where that is one) and the
        old clusters' references dropped after the next flush point."""
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t nh, r, k
        cdef uint64_t e, bm, lack, have, ne
        cdef Table t
        undo = []
        for off, views, e, bm, lack, have, key in todo:
            nh, total = targets[key]
            r = self.snaps.l2_refs.get(off, 1)
            ne = <uint64_t>nh | (COPIED if total == 1 and nh else 0)
            t = self.cmap.load_l2(off)
            t.put(2 * i2, ne)
            t.put(2 * i2 + 1, (bm & SUB_ZERO_ALL) | have | lack)
            if (e & OFFSET_MASK) and (e & OFFSET_MASK) != <uint64_t>nh:
                for k in range(r):
                    self._drop_ref((e & OFFSET_MASK) >> self.cluster_bits, 1)
            for v in views:
                undo.append((v, nh, e, bm))
        for nh, total in targets.values():
            if total > 1 and nh:
                self.rc.add(nh >> self.cluster_bits, total - 1)
        self.fresh.append((c, -1, undo))
        return True

    cdef int ext_unlink_views(self, int64_t c, list undo) except -1:
        """Undo ``ext_link_views`` in memory after a failed sync: each table a linked
        view names now that still names its new cluster names the old entry again; the
        counts taken are given back and the old clusters' drops cancelled. A table
        copied since (a guest write) is found through its view."""
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t nh, r, k
        cdef uint64_t olde, oldbm
        cdef Table t
        cdef dict linked = {}
        for rec in undo:
            linked.setdefault(rec[0], rec)
        for off, views in self.view_tables(c >> self.l2_bits):
            rec = None
            for v in views:
                if v in linked:
                    rec = linked[v]
                    break
            if rec is None:
                continue
            _v, nh, olde, oldbm = rec
            t = self.cmap.load_l2(off)
            if (t.get(2 * i2) & OFFSET_MASK) != <uint64_t>nh:
                continue
            if nh == 0 and t.get(2 * i2 + 1) != (oldbm & SUB_ZERO_ALL):
                continue              # no longer the entry the move left
            t.put(2 * i2, olde)
            t.put(2 * i2 + 1, oldbm)
            r = self.snaps.l2_refs.get(off, 1)
            if nh:
                self.rc.add(nh >> self.cluster_bits, -r)
            drop = self._held_by(olde)
            if drop is None or drop[0] == (nh >> self.cluster_bits):
                continue
            for k in range(r):
                for lst in (self.free_waiting, self.free_after_sync):
                    if drop in lst:
                        lst.remove(drop)
                        break
        return 0

    cdef bint ext_link_zero_views(self, int64_t c) except -1:
        """``ext_link_zero`` on an image with internal snapshots: the subclusters each
        view lacks are marked zero (no data, no counts change); False when none
        lacks any."""
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef uint64_t e, bm, lack
        cdef Table t
        cdef bint done = False
        self.ensure_tables(c << self.cluster_bits, self.cluster_size)
        for off, views in self.view_tables(c >> self.l2_bits):
            t = self.cmap.load_l2(off)
            e = t.get(2 * i2)
            bm = t.get(2 * i2 + 1)
            lack = ~(bm | (bm >> 32)) & SUB_ALLOC_ALL
            if (e & COMPRESSED_FLAG) or lack == 0:
                continue
            t.put(2 * i2 + 1, bm | (lack << 32))
            done = True
        return done
