# cython: language_level=3
"""The qcow2 driver's state and its write ordering.

``Qcow2Ordering`` holds what the driver knows (header fields, the cluster map, the
refcounts, the snapshots) and writes metadata back in the one order that survives a
crash, declared in ``flush_metadata`` (docs/crash-model.md):

1. refcount blocks, brand-new L2 tables and a grown refcount table, then a sync that
   covers the data written so far too (data before reference, counts before reference);
2. the header switch to a grown refcount table, or new refcount table entries, then a
   sync;
3. the references: changed L2 tables, then L1 entries (active, then snapshots');
   the next sync covers them;
4. reference drops (copy-on-write of shared clusters, overwritten compressed clusters)
   free their clusters only after that sync;

and a failed fdatasync makes everything written since the last good one count as not
written (``_sync_failed``): it is written again, or unlinked and copied again. Reads and
lookups never write or sync (blockpull._tablecache). ``Qcow2`` (blockpull._qcow2) adds
the write path.
"""
from libc.stdint cimport int64_t, uint64_t

from blockpull._q2compress cimport comp_extent
from blockpull._q2map cimport OFFSET_MASK, COMPRESSED_FLAG, COPIED


from blockpull._bitmaps import AUTOCLEAR_BITMAPS
from blockpull._q2header import AUTOCLEAR_DATA_RAW
from blockpull.errors import lost_writes_error


cdef class Qcow2Ordering(Driver):
    """The state and write-back order of an open qcow2 image (see the module docstring);
    not opened on its own: ``blockpull._qcow2.Qcow2`` is the driver."""

    cdef _drop_ref(self, int64_t host_cluster, int64_t n):
        """A reference to these clusters was removed in memory: decrement their counts only
        once that removal is durable."""
        self.free_waiting.append((host_cluster, n))

    cdef _autoclear(self):
        """Before the first change, clear the autoclear feature bits this driver does not
        maintain: all but bit 0. Persistent bitmaps (bit 0) are kept up to date (see
        blockpull._bitmaps), so their bit, extension and clusters stay as they are."""
        if self.autoclear_done:
            return
        self.autoclear_done = True
        keep = AUTOCLEAR_BITMAPS | (AUTOCLEAR_DATA_RAW if self.header.data_file_raw else 0)
        if self.version != 3 or not (self.autoclear & ~keep):
            return
        self.autoclear &= keep
        self.header.write_autoclear(self.file, self.autoclear)
        self._sync()

    cdef object _held_by(self, uint64_t e):
        """The host clusters L2 entry ``e`` holds a reference to, as (first, count), or
        None: one data cluster, or every cluster a compressed cluster's bytes touch."""
        cdef uint64_t coff, clen
        if self.external_data:
            return None     # data clusters of an external data file are not counted
        if e & COMPRESSED_FLAG:
            comp_extent(e, self.cluster_bits, &coff, &clen)
            return (coff >> self.cluster_bits,
                    ((coff + clen - 1) >> self.cluster_bits) - (coff >> self.cluster_bits) + 1)
        if e & OFFSET_MASK:
            return ((e & OFFSET_MASK) >> self.cluster_bits, 1)
        return None

    cdef list view_tables(self, int64_t l1i):
        """The distinct L2 tables that L1 index ``l1i`` names over all views (the
        active L1 first, then each internal snapshot's): [(table offset, [view
        index...])], view 0 the active one, v > 0 snapshot v - 1. A table shared by
        several views is listed once, with each of them (QEMU's docs/interop/qcow2.rst,
        "Snapshots")."""
        cdef int64_t off
        cdef Table l1
        cdef Py_ssize_t v = 0
        cdef dict at = {}
        cdef list out = []
        for l1 in [self.l1] + self.snaps.l1s:
            if l1i < (l1.nbytes >> 3) and (v > 0 or l1i < self.l1_size):
                off = l1.get(l1i) & OFFSET_MASK
                if off:
                    if off not in at:
                        at[off] = []
                        out.append((off, at[off]))
                    at[off].append(v)
            v += 1
        return out

    # ---- ordering -----------------------------------------------------------------

    cdef _sync(self):
        try:
            if self.data_file is not None:
                # data in an external data file is durable before what links it
                self.data_file.fdatasync()
            self.file.fdatasync()
        except OSError as exc:
            self._sync_failed(exc)
            raise
        self.syncs += 1
        self._synced()
        if self.free_after_sync:
            pending = self.free_after_sync
            self.free_after_sync = []
            for c, n in pending:
                self.rc.free_now(c, n)

    cdef _synced(self):
        """A sync succeeded: what was written before it is durable."""
        self.fresh = []
        self.wrote_l2 = []
        self.rc.wrote = []
        self.wrote_l1 = set()
        self.snaps.wrote = {}
        self.wrote_rt = set()
        self.wrote_rt_header = False
        self.guest_dirty = False

    cdef _sync_failed(self, exc):
        """fdatasync failed: everything written since the last good sync counts as not
        written. Linux may have dropped those dirty pages already, and a later fdatasync
        can then succeed without writing them, so nothing may rely on them:

        - metadata written since then is marked dirty again and written anew, in order,
          by the next flush_metadata;
        - reference drops whose write was among them wait for that rewrite again
          before their clusters are freed;
        - clusters linked since then to new data (pulled copies, a guest's allocating
          writes) are unlinked in memory and given back, so that no table entry is ever
          written pointing at data that may not be there; a pull copies them again;
        - guest data written since then cannot be written again: every later ``flush``
          raises (see ``flush``)."""
        cdef Table t
        self.sync_failures += 1
        if self.guest_dirty and self.guest_lost is None:
            self.guest_lost = exc
        # reference drops written since the last good sync: freed only after their
        # rewrite is durable
        self.free_waiting = self.free_after_sync + self.free_waiting
        self.free_after_sync = []
        for t in self.wrote_l2:
            cur = self.l2_cache.lookup(t.offset)
            if cur is None:
                self.l2_cache.keep(t.offset, t)
                cur = t
            (<Table>cur).dirty = True
        for idx, t in self.rc.wrote:
            cur = self.rc.cache.lookup(idx)
            if cur is None:
                self.rc.cache.keep(idx, t)
                cur = t
            (<Table>cur).dirty = True
        self.l1_dirty |= self.wrote_l1
        self.snaps.rewrite_after_failed_sync()
        self.rc.dirty_entries |= self.wrote_rt
        if self.wrote_rt or self.wrote_rt_header:
            self.rt_unsynced = True
        if self.wrote_rt_header and not self.rc.moved:
            self.rt_header_redo = True
        for c, host, old in reversed(self.fresh):
            self._unlink_fresh(c, host, old)
        self._synced()
        self.rc.trim_tail()

    cdef _unlink_fresh(self, int64_t c, int64_t host, object old):
        """Undo, in memory, a link of cluster ``c`` to ``host`` whose data may be lost:
        ``old`` is the entry it replaced (a guest's allocating write), or None for a link
        into views that lacked the cluster (a pull's copy). A pull's compressed copy
        (blockpull._q2keep) passes its descriptor as ``host``: every host cluster its
        bytes touch loses the count the link took."""
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t refs = 0, off, k
        cdef Table t
        if self.external_data:
            # no counts to give back: the entry goes back to what it was (none for a
            # pull's copy), the data file's bytes stay unreferenced; an entry changed
            # since (a zero cluster: at cluster 0 its offset is the link's too) stays
            if self.cmap.l2_entry(c) == (<uint64_t>host | COPIED):
                t = self.cmap.load_l2(self.l1.get(l1i) & OFFSET_MASK)
                t.put(i2 << self.extended_l2, <uint64_t>old if old is not None else 0)
            return
        if old is None and <uint64_t>host & COMPRESSED_FLAG:
            off = self.l1.get(l1i) & OFFSET_MASK if l1i < self.l1_size else 0
            if off and self.cmap.load_l2(off).get(i2) == <uint64_t>host:
                self.cmap.load_l2(off).put(i2, 0)
                first, count = self._held_by(<uint64_t>host)
                for k in range(first, first + count):
                    self.rc.add(k, -1)
                if self.cmap.last_comp_vcluster == c:
                    self.cmap.last_comp_vcluster = -1
            return
        if old is not None:
            if (self.cmap.l2_entry(c) & OFFSET_MASK) != <uint64_t>host:
                return
            t = self.cmap.load_l2(self.l1.get(l1i) & OFFSET_MASK)
            t.put(i2, <uint64_t>old)
            self.rc.add(host >> self.cluster_bits, -1)
            drop = self._held_by(<uint64_t>old)
            if drop is not None:
                for lst in (self.free_waiting, self.free_after_sync):
                    if drop in lst:
                        lst.remove(drop)
                        break
            return
        for off, _views in self.view_tables(l1i):
            t = self.cmap.load_l2(off)
            if (t.get(i2) & OFFSET_MASK) == <uint64_t>host:
                t.put(i2, 0)
                refs += self.snaps.l2_refs.get(off, 1) if self.snaps.l1s else 1
        for k in range(refs):
            self.rc.add(host >> self.cluster_bits, -1)

    cpdef flush_metadata(self):
        """A flush point: write the metadata back in the one order that survives a crash
        (docs/crash-model.md), each step durable before the next names it:

        1. refcount blocks, brand-new L2 tables and a grown refcount table are written,
           then a sync (it covers the data written so far too);
        2. the header is switched to a grown refcount table, or new refcount table
           entries are written, then a sync;
        3. the references: changed L2 tables, then L1 entries (active and snapshots');
           the next sync covers them;
        4. reference drops made before this point are freed after that sync.
        """
        if not self.writable:
            return
        self._write_counts()
        self._sync()
        self._write_reftable()
        if self.rt_unsynced:
            self._sync()
            self.rt_unsynced = False
            for t in self.rc.cache.values():
                (<Table>t).new = False
        self._write_references()
        self.free_after_sync.extend(self.free_waiting)
        self.free_waiting = []

    cdef int _write_counts(self) except -1:
        """Step 1 of ``flush_metadata`` (no sync)."""
        cdef Table t
        self.rc.write_blocks()
        for t in self.l2_cache.values():
            if t.new:
                self.file.write_full(t.buf, t.nbytes, t.offset)
        self.rc.write_grown()
        return 0

    cdef int _write_reftable(self) except -1:
        """Step 2 of ``flush_metadata`` (no sync; sets ``rt_unsynced``)."""
        if self.rc.moved:
            self.header.write_reftable(self.file, self.rc.table.offset, self.rc.clusters)
            self.wrote_rt_header = True
            self.rt_header_redo = False
            # Written, the header may name the new table even if the sync below fails:
            # from here it is the live table (a later growth replaces it as such), and
            # the old one is freed only once a sync has made the switch durable.
            old_off, old_cl = self.rc.old_table
            self.free_after_sync.append((old_off >> self.cluster_bits, old_cl))
            self.rc.moved = False
            self.rc.dirty_entries = set()
            self.rt_unsynced = True
            return 0
        if self.rt_header_redo:
            # a switch whose sync failed: written again, synced below
            self.header.write_reftable(self.file, self.rc.table.offset, self.rc.clusters)
            self.wrote_rt_header = True
            self.rt_header_redo = False
            self.rt_unsynced = True
        if self.rc.dirty_entries:
            self.wrote_rt |= self.rc.write_entries()
            self.rt_unsynced = True
        return 0

    cdef int _write_references(self) except -1:
        """Step 3 of ``flush_metadata`` (no sync)."""
        cdef Table t
        for t in self.l2_cache.values():
            if t.new:
                t.new = False
                t.dirty = False
            elif t.dirty:
                self.file.write_full(t.buf, t.nbytes, t.offset)
                t.dirty = False
                self.wrote_l2.append(t)
        if self.l1_dirty:
            self.l1.write_entries(self.file, self.l1_dirty)
            self.wrote_l1 |= self.l1_dirty
            self.l1_dirty.clear()
            self.l1.dirty = False
        self.snaps.write_dirty(self.file)
        return 0

    cpdef flush(self):
        """Make everything written so far durable.

        Raises OSError (EIO) for ever once a failed fdatasync may have lost guest data
        written before it (see ``_sync_failed``): that data cannot be written again, so
        no later flush may report it durable; close the image and check what the guest
        wrote since its last successful flush. Pulled data is copied again instead and
        does not make flush fail."""
        self.sync_all()
        if self.guest_lost is not None:
            raise lost_writes_error(self.file.path, self.guest_lost)

    def sync_all(self):
        """``flush`` without the report of guest writes a failed sync lost: what a pull
        needs before it changes the backing link (what it copied is durable; guest data
        a failed sync lost is the guest's to hear of, through ``flush``)."""
        cdef Table t
        if not self.writable:
            return
        bm = self.bitmaps
        # the guest's data and the tables that link it first: a bitmap that cannot be
        # written (a full disk) must not cost the data (the bitmap stays in use)
        self._flush_and_sync()
        if bm is not None and bm.active:
            # then the bitmap data, its refcounts and the table entries naming new data
            # clusters; only once those are durable is in_use cleared (QEMU's
            # docs/interop/qcow2.rst, "Bitmaps")
            me = <object>self     # the bound methods (virtual), not the C functions
            bm.write_data(me.alloc_clusters, me.free_clusters)
            self._flush_and_sync()
            if bm.write_tables():
                self._sync()
            bm.set_in_use(False)
            self._sync()

    cdef _flush_and_sync(self):
        """Write the metadata back in order and make it durable, refcount blocks that the
        write-back itself dirtied included."""
        cdef Table t
        self.flush_metadata()
        self._sync()
        for t in self.rc.cache.values():
            if t.dirty:
                self.rc.write_blocks()
                self._sync()
                break
