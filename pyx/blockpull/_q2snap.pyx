# cython: language_level=3
"""qcow2 internal snapshots: their L1 tables and the L2 tables they share with the active
view (QEMU's docs/interop/qcow2.rst, "Snapshots").

A pull fills what the snapshots lack too, since their unallocated clusters read the same
backing chain: ``lacks`` says whether one does, ``put_entry`` links a cluster into every
snapshot view that lacks it. ``l2_refs`` counts the L1 entries (of every view) that
name each L2 table, so that an entry put into a shared table is counted once per view.
Snapshot L1 entries are written back at the owner's flush point (``write_dirty``). With
extended L2 entries ``lacks`` reads 128-bit entries and links go through blockpull._q2sub.
"""
from libc.stdint cimport int64_t, uint64_t

from blockpull._tablecache cimport Table
from blockpull._q2map cimport OFFSET_MASK, COMPRESSED_FLAG
from blockpull.errors import ImageFormatError


cdef class Snapshots:
    """The snapshots of the image in ``f``: ``table`` is the header's parse of the
    snapshot table (blockpull._q2header.parse_snapshot_table, entries already checked);
    ``cmap`` is the active view's cluster map, whose L2 cache serves every view."""

    def __init__(self, File f, ClusterMap cmap, list table):
        cdef int64_t i, e
        cdef Table t
        self.cmap = cmap
        self.l1s = []
        self.dirty = []
        self.l2_refs = {}
        self.wrote = {}
        for (l1_off, l1_size, _sid, _name, _pos) in table:
            t = Table(l1_off, l1_size * 8)
            if l1_size:
                f.read_full(t.buf, l1_size * 8, l1_off)
            self.l1s.append(t)
            self.dirty.append(set())
        if not self.l1s:
            return
        for t in [cmap.l1] + self.l1s:
            for i in range(t.nbytes >> 3):
                e = t.get(i) & OFFSET_MASK
                if e:
                    self.l2_refs[e] = self.l2_refs.get(e, 0) + 1

    def __len__(self):
        return len(self.l1s)

    cdef bint lacks(self, int64_t c) except -1:
        """Whether any snapshot has virtual cluster ``c`` unallocated; with extended L2
        entries, whether any has a subcluster of it neither allocated nor zero (a
        compressed cluster lacks none; QEMU's docs/interop/qcow2.rst, "Extended L2
        Entries")."""
        cdef int64_t l1i = c >> self.cmap.l2_bits
        cdef int64_t i2 = c & (self.cmap.l2_entries - 1)
        cdef Table sl1, t
        cdef int64_t off
        cdef uint64_t bm
        for sl1 in self.l1s:
            if l1i >= (sl1.nbytes >> 3):
                continue
            off = sl1.get(l1i) & OFFSET_MASK
            if off == 0:
                return True
            t = self.cmap.load_l2(off)
            if not self.cmap.extended_l2:
                if t.get(i2) == 0:
                    return True
            elif not (t.get(2 * i2) & COMPRESSED_FLAG):
                bm = t.get(2 * i2 + 1)
                if (~(bm | (bm >> 32))) & 0xFFFFFFFFULL:
                    return True
        return False

    cdef int64_t views_lacking(self, int64_t c) except -1:
        """How many snapshots (views) take a reference to a cluster that ``put_entry``
        links at virtual cluster ``c``: those whose L1 entry names no L2 table yet, or
        whose L2 entry for ``c`` is 0 (standard entries)."""
        cdef int64_t l1i = c >> self.cmap.l2_bits
        cdef int64_t i2 = c & (self.cmap.l2_entries - 1)
        cdef int64_t off, n = 0
        cdef Table sl1
        for sl1 in self.l1s:
            if l1i >= (sl1.nbytes >> 3):
                continue
            off = sl1.get(l1i) & OFFSET_MASK
            if off == 0 or self.cmap.load_l2(off).get(i2) == 0:
                n += 1
        return n

    cdef int views_fit(self, int64_t c, bint active, uint64_t rc_max, path) except -1:
        """Raise ImageFormatError, before any view is changed, when a cluster linked at
        virtual cluster ``c`` into every view lacking it (the active one too when
        ``active``) would need a refcount above ``rc_max``, the most the image's
        ``refcount_bits`` hold (QEMU's docs/interop/qcow2.rst, "Header",
        refcount_order). With extended L2 entries every view is counted (one may lack
        a subcluster of a cluster it has)."""
        cdef int64_t need
        if <uint64_t>(1 + len(self.l1s)) <= rc_max:
            return 0        # every view at once fits: nothing to count (a pull's case)
        if self.cmap.extended_l2:
            need = 1 + len(self.l1s)
        else:
            need = self.views_lacking(c) + (1 if active else 0)
        if <uint64_t>need > rc_max:
            raise ImageFormatError(
                "%s: a cluster copied into the %d views (the image and its internal "
                "snapshots) that lack it needs a refcount of %d, more than its refcounts "
                "hold (at most %d): widen them with 'qemu-img amend -o refcount_bits=16'"
                % (path, need, need, rc_max))
        return 0

    cdef list missing_tables(self, int64_t l1i):
        """The snapshots whose L1 entry ``l1i`` names no L2 table."""
        cdef Table sl1
        cdef Py_ssize_t si
        out = []
        for si in range(len(self.l1s)):
            sl1 = self.l1s[si]
            if l1i < (sl1.nbytes >> 3) and (sl1.get(l1i) & OFFSET_MASK) == 0:
                out.append(si)
        return out

    cdef int attach(self, Py_ssize_t si, int64_t l1i, int64_t off) except -1:
        """Point snapshot ``si``'s L1 entry ``l1i`` at the new L2 table at ``off``."""
        cdef Table sl1 = self.l1s[si]
        sl1.put(l1i, <uint64_t>off)
        self.dirty[si].add(l1i)
        self.l2_refs[off] = 1
        return 0

    cdef int64_t put_entry(self, int64_t c, uint64_t entry, set done) except -1:
        """Put ``entry`` for cluster ``c`` into every snapshot's L2 table that lacks it
        (tables in ``done`` were seen already; each one seen is added). The tables must
        exist. Returns the number of references made. Standard (64-bit) entries only:
        an image with extended L2 entries links through blockpull._q2sub (ValueError)."""
        cdef int64_t l1i = c >> self.cmap.l2_bits
        cdef int64_t i2 = c & (self.cmap.l2_entries - 1)
        cdef int64_t refs = 0, off
        cdef Table sl1, t
        if self.cmap.extended_l2:
            raise ValueError("put_entry takes standard L2 entries, not extended ones")
        for sl1 in self.l1s:
            if l1i >= (sl1.nbytes >> 3):
                continue
            off = sl1.get(l1i) & OFFSET_MASK
            if off in done:
                continue
            t = self.cmap.load_l2(off)
            if t.get(i2) == 0:
                t.put(i2, entry)
                refs += self.l2_refs.get(off, 1)
            done.add(off)
        return refs

    cdef int write_dirty(self, File f) except -1:
        """Write the changed snapshot L1 entries (by 512-byte sector); no sync."""
        cdef Py_ssize_t si
        cdef Table sl1
        for si in range(len(self.l1s)):
            dirty = self.dirty[si]
            if dirty:
                sl1 = self.l1s[si]
                sl1.write_entries(f, dirty)
                self.wrote.setdefault(si, set()).update(dirty)
                dirty.clear()
        return 0

    cdef int rewrite_after_failed_sync(self) except -1:
        """A sync failed: the entries written since the last good one are dirty again."""
        for si, idxs in self.wrote.items():
            self.dirty[si] |= idxs
        self.wrote = {}
        return 0
