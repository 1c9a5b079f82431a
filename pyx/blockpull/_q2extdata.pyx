# cython: language_level=3
"""qcow2 extended L2 entries in an image with an external data file.

With incompatible bit 2 every data cluster lives in the external data file at its guest
offset, and with incompatible bit 4 its L2 entry is 128 bits (QEMU's
docs/interop/qcow2.rst, "Header" and "Extended L2 Entries"): the entry's host offset is
the cluster's guest offset (offset 0 with COPIED set for guest cluster 0), the bitmap says
which subclusters the data file holds ("allocated") and which read as zeros. Nothing is
allocated in the image file for data and nothing is refcounted for it.

``Qcow2ExtData`` sits between ``Qcow2Sub`` and the driver (blockpull._qcow2.Qcow2) and
takes over the subcluster paths that place data, only for such an image (every other
image goes on to ``Qcow2Sub``):

- a guest write writes the subclusters it touches at their guest offsets, partly covered
  ones filled from what they read now (the data file, zeros, or the chain below), and
  marks them allocated; whole clusters are written in runs;
- a pull or copy-on-read writes only the subclusters the top lacks (neither allocated
  nor zero) into the data file, from the chain's data, and marks them allocated: the
  top's own data and zeros, already in place, are never overwritten;
- after a failed fdatasync the subclusters allocated since the last good sync are
  unallocated again (their data may be lost), with no count to give back.

The crash order is the driver's (docs/crash-model.md): the data file's bytes under a
subcluster no entry marks allocated are never read, the data file is synced before the
image file, and the entry that marks them is written at the next flush point.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

from blockpull._fileio cimport File
from blockpull._tablecache cimport Table
from blockpull._q2map cimport OFFSET_MASK, COPIED, COMPRESSED_FLAG, ZERO_FLAG
from blockpull._q2sub cimport SUB_ALLOC_ALL, SUB_ZERO_ALL, mask_run, sub_mask

from blockpull.errors import ImageFormatError


cdef int write_lacking(File f, object view, int64_t vaddr, uint64_t mask,
                       int sc_bits) except -1:
    """Write the subclusters set in ``mask`` of the cluster whose bytes are ``view``
    (from guest offset ``vaddr``; shorter than a cluster at the disk's end) into the
    data file ``f`` at their guest offsets, a run of them in one write. Raises
    OSError."""
    cdef int s = 0, t
    cdef int64_t a, b, n = len(view)
    while True:
        s = mask_run(mask, s, &t)
        if s == 32:
            break
        a = <int64_t>s << sc_bits
        b = min(<int64_t>t << sc_bits, n)
        if a < b:
            f.writev_data([view[a:b]], vaddr + a)
        s = t
    return 0


cdef class Qcow2ExtData(Qcow2Sub):
    """The subcluster paths of an image with an external data file (see the module
    docstring); not opened on its own: ``blockpull._qcow2.Qcow2`` is the driver."""

    cdef uint64_t ext_lack_mask(self, int64_t c) except? 0xFFFFFFFFFFFFFFFF:
        """The subclusters of cluster ``c`` neither allocated nor zero (bit x for
        subcluster x; 0 for a compressed cluster)."""
        cdef uint64_t e, bm
        self.ext_get(c, &e, &bm)
        if self.external_data:
            self._check_entry(c, e)
        if e & COMPRESSED_FLAG:
            return 0
        return ~(bm | (bm >> 32)) & SUB_ALLOC_ALL

    def data_offset_named(self, int64_t vaddr):
        """Whether the L2 entry of the cluster at ``vaddr`` (bytes) names a place in the
        external data file (its guest offset; offset 0 counts when COPIED is set and it
        is no zero cluster), as ``qemu-img map`` reports it. False without a data file."""
        cdef uint64_t e
        if not self.external_data or vaddr < 0 or vaddr >= self.size:
            return False
        e = self.cmap.l2_entry(vaddr >> self.cluster_bits)
        if e & OFFSET_MASK:
            return True
        if not (e & COPIED):
            return False
        return self.extended_l2 or self.version < 3 or not (e & ZERO_FLAG)

    cdef int _need_data_file(self) except -1:
        if self.data_file is None:
            raise ImageFormatError("%s: its external data file is not open" % self.file.path)
        return 0

    cdef int _check_entry(self, int64_t c, uint64_t e) except -1:
        """Refuse to write through an entry a reader refuses too: a compressed one, or
        one naming a place other than the cluster's guest offset (the image is corrupt;
        'qemu-img check' says where)."""
        cdef uint64_t off = e & OFFSET_MASK
        if e & COMPRESSED_FLAG or (off and off != <uint64_t>c << self.cluster_bits):
            raise ImageFormatError("%s: L2 entry for cluster %d (0x%x) is not a data cluster "
                                   "at its guest offset 0x%x in the external data file; run "
                                   "'qemu-img check' on it" % (self.file.path, c, e,
                                                               c << self.cluster_bits))
        return 0

    cdef int ext_sub_content(self, int64_t c, int sub, uint64_t e, uint64_t bm,
                             bytearray buf, int64_t at, object fill) except -1:
        """What subcluster ``sub`` of cluster ``c`` reads now, into ``buf[at:]``; an
        allocated one is read from the data file at its guest offset."""
        cdef int sb = self.cmap.sc_bits
        cdef int64_t vs = (c << self.cluster_bits) + (<int64_t>sub << sb)
        cdef int64_t want = min(1LL << sb, self.size - vs)
        cdef unsigned char* p = buf
        if not self.external_data or not (bm & (1ULL << sub)):
            return Qcow2Sub.ext_sub_content(self, c, sub, e, bm, buf, at, fill)
        memset(p + at, 0, 1LL << sb)
        if want > 0:
            self.data_file.read_full(p + at, want, vs)
        return 0

    cdef int ext_write(self, int64_t vaddr, const unsigned char* src, int64_t n,
                       object fill) except -1:
        """A guest write of ``n`` bytes at ``vaddr``: whole clusters in runs at their
        guest offsets, the rest per cluster (``ext_write_cluster``)."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t pos = 0, v, coff, take, k
        if not self.external_data:
            return Qcow2Sub.ext_write(self, vaddr, src, n, fill)
        self._need_data_file()
        while pos < n:
            v = vaddr + pos
            coff = v & (cs - 1)
            take = min(cs - coff, n - pos)
            if take == cs:
                k = min((n - pos) // cs, 256)
                self.ext_data_run(v >> self.cluster_bits, src + pos, k)
                pos += k * cs
                continue
            self.ext_write_cluster(v >> self.cluster_bits, coff, src + pos, take, fill)
            pos += take
        return 0

    cdef int ext_data_run(self, int64_t c, const unsigned char* src, int64_t k) except -1:
        """Write ``k`` whole clusters from ``c`` on at their guest offsets, every
        subcluster allocated."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t g = c << self.cluster_bits, i
        cdef uint64_t e, bm, newe
        for i in range(k):
            self.ext_get(c + i, &e, &bm)
            self._check_entry(c + i, e)
        self.ensure_tables(g, k * cs)      # tables before data
        self.guest_dirty = True
        self.data_file.write_full(src, min(k * cs, self.size - g), g)
        for i in range(k):
            newe = (<uint64_t>(c + i) << self.cluster_bits) | COPIED
            self.ext_get(c + i, &e, &bm)
            if e == newe and bm == SUB_ALLOC_ALL:
                continue        # written in place
            self.ext_put(c + i, newe, SUB_ALLOC_ALL)
            if (bm & SUB_ALLOC_ALL) != SUB_ALLOC_ALL:
                self.fresh.append((c + i, <int64_t>(newe & OFFSET_MASK), (e, bm)))
        return 0

    cdef int ext_write_cluster(self, int64_t c, int64_t coff, const unsigned char* src,
                               int64_t n, object fill) except -1:
        """Write ``n`` bytes at byte ``coff`` of cluster ``c``: the subclusters it
        touches, at their guest offsets, partly covered ones filled from what they read
        now; they become allocated and the entry names the guest offset."""
        cdef int sb = self.cmap.sc_bits
        cdef int64_t scs = 1LL << sb
        cdef int64_t g = c << self.cluster_bits
        cdef uint64_t e, bm, wmask, newbm, newe
        cdef int s0, s1
        cdef int64_t a, b
        cdef bytearray buf
        cdef unsigned char* p
        if not self.external_data:
            return Qcow2Sub.ext_write_cluster(self, c, coff, src, n, fill)
        self._need_data_file()
        self.ext_get(c, &e, &bm)
        self._check_entry(c, e)
        s0 = <int>(coff >> sb)
        s1 = <int>((coff + n - 1) >> sb)
        a = <int64_t>s0 << sb
        b = (<int64_t>s1 + 1) << sb
        wmask = sub_mask(s0, s1 + 1)
        buf = bytearray(b - a)
        p = buf
        if coff != a:
            self.ext_sub_content(c, s0, e, bm, buf, 0, fill)
        if coff + n != b and (s1 != s0 or coff == a):
            self.ext_sub_content(c, s1, e, bm, buf, b - a - scs, fill)
        memcpy(p + (coff - a), src, n)
        newbm = (bm | wmask) & ~(wmask << 32)
        newe = <uint64_t>g | COPIED
        if newbm != bm or newe != e:
            self.ensure_tables(g, self.cluster_size)     # tables before data
        self.guest_dirty = True
        self.data_file.write_full(p, min(b, self.size - g) - a, g + a)
        if (bm & wmask) != wmask:
            # newly allocated subclusters: unallocated again if a sync loses their data
            self.fresh.append((c, <int64_t>g, (e, bm)))
        if newbm != bm or newe != e:
            self.ext_put(c, newe, newbm)
        return 0

    cdef bint ext_link(self, int64_t vaddr, int64_t host) except -1:
        """Mark the subclusters the cluster at ``vaddr`` lacks as allocated: the caller
        wrote the chain's data for exactly those (``ext_lack_mask``) at their guest
        offsets (``host`` is the guest offset). False when it lacks none."""
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef uint64_t e, bm, lack
        if not self.external_data:
            return Qcow2Sub.ext_link(self, vaddr, host)
        self._bound_dirty()
        self.ext_get(c, &e, &bm)
        self._check_entry(c, e)
        lack = ~(bm | (bm >> 32)) & SUB_ALLOC_ALL
        if lack == 0:
            return False
        self.ext_put(c, (<uint64_t>c << self.cluster_bits) | COPIED, bm | lack)
        self.fresh.append((c, c << self.cluster_bits, (e, bm)))
        return True

    cdef bint ext_data_fill(self, int64_t vaddr, object view) except -1:
        """Copy-on-read of the cluster at ``vaddr``: of ``view`` (what the chain below
        reads there, one cluster or up to the disk's end) write the subclusters the top
        lacks at their guest offsets, then mark them allocated. False when it lacks
        none. Raises OSError (nothing is linked then)."""
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef uint64_t lack = self.ext_lack_mask(c)
        if lack == 0:
            return False
        self._need_data_file()
        self.ensure_tables(c << self.cluster_bits, self.cluster_size)    # tables before data
        write_lacking(self.data_file, view, c << self.cluster_bits, lack, self.cmap.sc_bits)
        return self.ext_link(vaddr, c << self.cluster_bits)

    cdef _unlink_fresh(self, int64_t c, int64_t host, object old):
        """Undo, after a failed sync, what a change of cluster ``c`` allocated: the
        subclusters allocated since the entry and bitmap ``old`` (their data in the
        data file may be lost) are unallocated again, a zero bit they had before comes
        back; the entry goes back to ``old``'s when no subcluster is left allocated.
        Later changes of other subclusters (zero bits) stay; nothing is counted."""
        cdef uint64_t e, bm, olde, oldbm, gained, newbm
        cdef int64_t i
        cdef Table t
        if not (self.external_data and self.extended_l2):
            Qcow2Sub._unlink_fresh(self, c, host, old)
            return
        olde, oldbm = old
        self.ext_get(c, &e, &bm)
        gained = bm & SUB_ALLOC_ALL & ~oldbm
        newbm = (bm & ~gained & ~(gained << 32)) | (oldbm & (gained << 32))
        if newbm == bm:
            return
        if (newbm & SUB_ALLOC_ALL) == 0 and (olde & (OFFSET_MASK | COPIED)) == 0:
            e = olde
        i = c & (self.l2_entries - 1)
        t = self.cmap.load_l2(self.l1.get(c >> self.l2_bits) & OFFSET_MASK)
        t.put(2 * i, e)
        t.put(2 * i + 1, newbm)
