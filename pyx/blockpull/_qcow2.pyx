# cython: language_level=3
"""qcow2 (versions 2 and 3): the driver and its write path.

The concerns live in modules of their own, used here: the header (blockpull._q2header),
the cluster map (_q2map: L1/L2 lookup, extended L2), refcounts and allocation
(_q2refcount), compressed clusters (_q2compress), internal snapshots (_q2snap), the
table cache (_tablecache), and the driver's state with its write ordering (_q2order:
``Qcow2Ordering.flush_metadata`` declares the order). Guest writes and the pull's links
come here:

0. tables before data: the L2 tables a range needs are made, and new metadata clusters
   have their space claimed, before its data clusters are reserved, so that a full disk
   fails an allocation rather than the write-back of what is already linked;
1. data clusters are written by the caller (``write`` / the stream loop) into clusters
   nobody points at yet; the entries that link them are written at the next flush point.

A crash at any instant therefore leaves at worst leaked clusters, never a reference to a
cluster whose data or count is not on disk.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

from blockpull._fileio cimport File
from blockpull._driver cimport KIND_UNALLOC, KIND_DATA, KIND_ZERO, KIND_COMPRESSED
from blockpull._tablecache cimport Table
from blockpull._q2map cimport ClusterMap, OFFSET_MASK, COPIED, COMPRESSED_FLAG, ZERO_FLAG
from blockpull._q2refcount cimport Refcounts
from blockpull._q2snap cimport Snapshots
from blockpull._q2order cimport Qcow2Ordering
from blockpull._q2compress cimport comp_extent
from blockpull._q2extdata cimport Qcow2ExtData
from blockpull._q2zero cimport ext_write_zeroes, zero_unit_whole
from blockpull.errors import ImageFormatError
from blockpull._bitmaps import Bitmaps, AUTOCLEAR_BITMAPS
from blockpull._q2header import (Header, MAGIC, EXT_END, EXT_BACKING_FORMAT, AUTOCLEAR_DATA_RAW,
                                 EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE,
                                 INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE,
                                 INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, KNOWN_INCOMPAT,
                                 FEATURE_NAMES, create, probe)


cdef int64_t L2_CACHE_BYTES = 32 * 1024 * 1024

def _fmt_err(path, msg):
    return ImageFormatError("%s: %s" % (path, msg))




cdef class Qcow2(Qcow2ExtData):
    """A qcow2 image file (v2 or v3)."""

    def __init__(self, File f, bint writable, *, bint metadata_only=False,
                 int64_t l2_cache_bytes=L2_CACHE_BYTES):
        """Open the qcow2 image in ``f``. ``metadata_only`` (read-only opens for
        checking): accept encrypted images, whose tables are not encrypted; their data
        cannot be read. ``l2_cache_bytes``: the L2 table cache's budget in bytes (default
        32 MiB; at least 16 tables are kept); dirty tables may exceed it until the next
        write, which flushes first. Raises ImageFormatError for a malformed image."""
        self.file = f
        self.writable = writable
        self.metadata_only = metadata_only and not writable
        self.format = "qcow2"
        self.l2_cache_bytes = l2_cache_bytes
        self.l1_dirty = set()
        self.free_waiting = []
        self.free_after_sync = []
        self._parse()
        self._synced()

    # ---- header -----------------------------------------------------------------

    def _parse(self):
        cdef int64_t file_size = self.file.size()
        h = Header.read(self.file, file_size, self.writable, self.metadata_only)
        self.header = h
        self.version = h.version
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.crypt_method = h.crypt_method
        self.size = h.size
        self.incompatible = h.incompatible
        self.compatible = h.compatible
        self.autoclear = h.autoclear
        self.header_length = h.header_length
        self.refcount_order = h.refcount_order
        self.compression_type = h.compression_type
        self.extended_l2 = h.extended_l2
        self.nb_snapshots = h.nb_snapshots
        self.snapshots_offset = h.snapshots_offset
        self.crypto_header = h.crypto_header
        self._take_names()
        self.l2_bits = h.l2_bits
        self.l2_entries = 1 << self.l2_bits
        self.l1_offset = h.l1_offset
        self.l1_size = h.l1_size
        self.rc = Refcounts(self.file, self.cluster_bits, self.refcount_order,
                            h.rt_offset, h.rt_clusters, file_size)
        self.cmap = ClusterMap(self.file, self.rc, h, self.l2_cache_bytes)
        self.l1 = self.cmap.l1
        self.l2_cache = self.cmap.cache
        self.has_zero_flag = self.version == 3
        self.external_data = h.data_file
        self.autoclear_done = (self.autoclear & ~self._autoclear_kept()) == 0
        # a pull fills what the snapshots lack too: their unallocated clusters read
        # the same backing chain
        self.snaps = Snapshots(self.file, self.cmap, h.snapshots)
        self.bitmaps = None
        if self.writable and self.version == 3 and self.autoclear & AUTOCLEAR_BITMAPS:
            for (etype, data, off) in self.extensions:
                if etype == EXT_BITMAPS:
                    self.bitmaps = Bitmaps(self.file, bytes(data), self.cluster_bits,
                                           self.size, file_size, self.refcount)
                    break

    def _autoclear_kept(self):
        """The autoclear bits this driver keeps true while it writes: bit 0 (persistent
        bitmaps, kept up to date) and bit 1 (raw external data: every write goes to the
        data file at its guest offset, zeros included)."""
        if self.header.data_file_raw:
            return AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_RAW
        return AUTOCLEAR_BITMAPS

    def attach_data_file(self, File f):
        """Give an image with an external data file (incompatible bit 2) the file its
        data clusters live in, opened (writable with the image), checked and locked by
        the caller; it is closed with the driver. Raises ValueError for an image
        without one."""
        if not self.external_data:
            raise ValueError("%s has no external data file" % self.file.path)
        self.data_file = f
        self.cmap.data = f

    @property
    def data_file_name(self):
        """The external data file's name as the header records it, or None."""
        return self.header.data_file_name if self.external_data else None

    @property
    def data_file_raw(self):
        """True when the external data file is itself a raw image of the guest
        (autoclear bit 1)."""
        return bool(self.header.data_file_raw)

    def _take_names(self):
        """The backing link and the extensions, as the header now names them."""
        h = self.header
        self.extensions = h.extensions
        self.backing_name = h.backing_name
        self.backing_format = h.backing_format
        self.backing_offset = h.backing_offset
        self.backing_size = h.backing_size

    # ---- tables -----------------------------------------------------------------

    cdef int _cache_put_l2(self, Table t) except -1:
        """Keep L2 table ``t``; only clean tables make room (nothing is written here)."""
        self.l2_cache.put(t.offset, t)
        return 0

    cdef int _bound_dirty(self) except -1:
        """On the write path, before a change: when dirty tables hold either cache over
        its budget, run a flush point (``flush_metadata``) so that they can be dropped.
        Lookups never do this: a read or a map never writes or syncs."""
        if self.l2_cache.excess() or self.rc.cache.excess():
            self.flush_metadata()
            self.l2_cache.drop_clean()
            self.rc.cache.drop_clean()
        return 0

    cpdef tuple block_status(self, int64_t vaddr, int64_t n):
        return self.cmap.block_status(vaddr, n)

    cdef int read_layer(self, int64_t vaddr, unsigned char* out, int64_t n, int kind,
                        int64_t host) except -1:
        return self.cmap.read_layer(vaddr, out, n, kind, host)

    # ---- refcounts ----------------------------------------------------------------

    def refcount(self, int64_t cluster):
        """Refcount of host cluster ``cluster`` (0 where no refcount block covers it)."""
        return self.rc.get(cluster)

    cdef int64_t _alloc_table(self) except -1:
        """One counted cluster for a new L2 table, its space claimed; given back if the
        claim fails."""
        cdef int64_t off = self.alloc_clusters(1)
        try:
            self.rc.claim(off >> self.cluster_bits, 1)
        except Exception:
            self.free_clusters(off, 1)
            raise
        return off

    cpdef int64_t alloc_clusters(self, int64_t n) except -1:
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        self._autoclear()
        return self.rc.alloc(n)

    def ensure_tables(self, int64_t vaddr, int64_t n):
        """Make the L2 tables (empty, their space claimed) that linking clusters in
        [vaddr, vaddr+n) will need, in the active view and in every snapshot's: tables
        before data, so that a full disk fails the allocation before any data depends
        on it, and linking afterwards needs no space."""
        cdef int64_t span = self.l2_bits + self.cluster_bits
        cdef int64_t l1i, last
        if n <= 0:
            return
        self._bound_dirty()
        last = (vaddr + n - 1) >> span
        for l1i in range(vaddr >> span, last + 1):
            self._tables_for(l1i)

    cdef int _tables_for(self, int64_t l1i) except -1:
        """Make the L2 tables L1 index ``l1i`` lacks, in the active view and in every
        snapshot's (empty, their space claimed)."""
        if l1i < self.l1_size and (self.l1.get(l1i) & OFFSET_MASK) == 0:
            self._l2_for_write(l1i)
        for si in self.snaps.missing_tables(l1i):
            self.snaps.attach(si, l1i, self._new_l2(None).offset)
        return 0

    cdef Table _new_l2(self, Table copy_of):
        """A new L2 table (empty, or a copy of ``copy_of``) in a counted cluster whose
        space is claimed, kept in the cache as new: written at the next flush point."""
        cdef Table nt = Table(self._alloc_table(), self.cluster_size)
        if copy_of is not None:
            memcpy(nt.buf, copy_of.buf, self.cluster_size)
        nt.new = True
        nt.dirty = True
        self._cache_put_l2(nt)
        return nt

    cpdef free_clusters(self, int64_t host, int64_t n):
        """Give back ``n`` clusters from ``alloc_clusters`` that were never linked: the
        count drops at once. When they were the last ones allocated, the file's tail of
        free clusters is cut off (never on a block device), so that space a failed
        write took (a full disk) is returned."""
        cdef int64_t c = host >> self.cluster_bits
        self.rc.free_now(c, n)
        self.rc.trim_tail()

    cdef _bitmaps_mark(self, int64_t vaddr, int64_t n):
        """A guest write of [vaddr, vaddr + n) is about to change the image: flag the
        enabled bitmaps in use (durably, once until the next flush) and set their bits.
        The pull and copy-on-read change no byte the guest reads and never come here."""
        if self.bitmaps is None or n <= 0 or not self.bitmaps.tracking:
            return
        if not self.bitmaps.active:
            self.bitmaps.set_in_use(True)
            self._sync()
        self.bitmaps.mark(vaddr, n)

    # ---- writes -------------------------------------------------------------------

    cdef Table _l2_for_write(self, int64_t l1i):
        """The L2 table for L1 entry l1i, allocated or copied so that it may be written."""
        cdef uint64_t l1e
        cdef int64_t off
        cdef Table t, nt
        if l1i >= self.l1_size:
            raise _fmt_err(self.file.path, "write past the L1 table")
        l1e = self.l1.get(l1i)
        off = l1e & OFFSET_MASK
        if off == 0:
            nt = self._new_l2(None)
            self.l1.put(l1i, <uint64_t>nt.offset | COPIED)
            self.l1_dirty.add(l1i)
            if self.snaps.l1s:
                self.snaps.l2_refs[nt.offset] = 1
            return nt
        t = self.cmap.load_l2(off)
        if l1e & COPIED:
            return t
        if self.rc.get(off >> self.cluster_bits) == 1:
            self.l1.put(l1i, l1e | COPIED)
            self.l1_dirty.add(l1i)
            return t
        # shared with a snapshot: copy the table, never write the shared one
        nt = self._new_l2(t)
        self.l1.put(l1i, <uint64_t>nt.offset | COPIED)
        self.l1_dirty.add(l1i)
        self._drop_ref(off >> self.cluster_bits, 1)
        if self.snaps.l1s:
            self.snaps.l2_refs[nt.offset] = 1
            self.snaps.l2_refs[off] = self.snaps.l2_refs.get(off, 1) - 1
        return nt

    cdef int _entry_ok(self, int64_t c, uint64_t e) except -1:
        """Raise ImageFormatError, as a read does, when the standard L2 entry ``e`` of
        cluster ``c`` names a host cluster that is unaligned or past the end of the file
        (with an external data file: any offset but the cluster's guest offset): a write
        must not go there (nor drop a reference to it)."""
        cdef uint64_t off = e & OFFSET_MASK
        if self.external_data:
            # data lies in the data file at the cluster's guest offset, nowhere else
            if off and off != (<uint64_t>c << self.cluster_bits):
                raise self.cmap._err("L2 entry for cluster %d points at 0x%x in the external "
                                     "data file, not at its guest offset 0x%x"
                                     % (c, off, <uint64_t>c << self.cluster_bits))
            return 0
        if e & COMPRESSED_FLAG or off == 0:
            return 0
        if off & <uint64_t>(self.cluster_size - 1):
            raise self.cmap._err("L2 entry for cluster %d points at unaligned offset 0x%x"
                                 % (c, off))
        if off + <uint64_t>self.cluster_size > self.rc.host_end():
            raise self.cmap._err("L2 entry for cluster %d points past the end of "
                                 "the file (0x%x)" % (c, off))
        return 0

    cdef bint _writable_in_place(self, uint64_t e):
        cdef int64_t off = e & OFFSET_MASK
        if e & COMPRESSED_FLAG or off == 0:
            return False
        if self.version == 3 and e & ZERO_FLAG:
            return False
        if e & COPIED:
            return True
        return self.rc.get(off >> self.cluster_bits) == 1

    cpdef write(self, int64_t vaddr, object data, object fill):
        cdef const unsigned char[::1] src
        cdef int64_t cs = self.cluster_size
        cdef int64_t n, pos, v, c, coff, take, run_start, run_n, i, host, k
        cdef uint64_t e, e2
        cdef Table t
        cdef bytearray buf
        cdef unsigned char[::1] bv
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        src = memoryview(data).cast("B")
        n = src.shape[0]
        if vaddr < 0 or vaddr + n > self.size:
            raise ValueError("write [%d, %d) outside the virtual size %d" % (vaddr, vaddr + n, self.size))
        self._bound_dirty()
        self._autoclear()
        self._bitmaps_mark(vaddr, n)
        if self.extended_l2:
            if n:
                self.ext_write(vaddr, &src[0], n, fill)
            return
        if self.external_data:
            return self._write_ext(vaddr, src, fill)
        pos = 0
        while pos < n:
            v = vaddr + pos
            c = v >> self.cluster_bits
            coff = v & (cs - 1)
            take = min(cs - coff, n - pos)
            e = self.cmap.l2_entry(c)
            self._entry_ok(c, e)
            if self._writable_in_place(e):
                # in place: extend over following clusters that are contiguous on the host
                host = (e & OFFSET_MASK) + coff
                run_n = take
                k = 1
                while pos + run_n < n:
                    e2 = self.cmap.l2_entry(c + k)
                    self._entry_ok(c + k, e2)
                    if not self._writable_in_place(e2) or (e2 & OFFSET_MASK) != (e & OFFSET_MASK) + k * cs:
                        break
                    run_n += min(cs, n - pos - run_n)
                    k += 1
                self.guest_dirty = True
                self.file.write_full(&src[pos], run_n, host)
                if not (e & COPIED):
                    self._set_l2(c, e | COPIED)
                pos += run_n
                continue
            # allocate: a run of clusters that all need new space
            run_start = c
            k = 1
            while pos + (k * cs - coff) < n and k < 256:
                e2 = self.cmap.l2_entry(c + k)
                self._entry_ok(c + k, e2)
                if self._writable_in_place(e2):
                    break
                k += 1
            run_n = min(k * cs - coff, n - pos)
            buf = self._run_buffer(c, k, coff, &src[pos], run_n, fill)
            bv = buf
            self.ensure_tables(c << self.cluster_bits, k * cs)     # tables before data
            host = self.alloc_clusters(k)
            i = 0
            try:
                self.guest_dirty = True
                self.file.write_full(&bv[0], k * cs, host)
                while i < k:
                    e2 = self.cmap.l2_entry(c + i)
                    self._replace(c + i, <uint64_t>(host + i * cs) | COPIED)
                    self.fresh.append((c + i, host + i * cs, e2))
                    i += 1
            except Exception:
                # nothing points at the clusters not linked yet: give them back
                self.free_clusters(host + i * cs, k - i)
                raise
            pos += run_n

    cdef bytearray _run_buffer(self, int64_t c, int64_t k, int64_t coff,
                               const unsigned char* src, int64_t n, object fill):
        """The ``k`` whole clusters from cluster ``c`` that a write of ``n`` bytes at
        ``coff`` into the first of them fills: the head and tail clusters it covers only
        in part hold what they read now, the rest is the written bytes."""
        cdef int64_t cs = self.cluster_size
        cdef bytearray buf = bytearray(k * cs)
        cdef unsigned char[::1] bv = buf
        if coff:
            self._old_content(c, bv[:cs], fill)
        if (coff + n) & (cs - 1):
            self._old_content(c + k - 1, bv[(k - 1) * cs:], fill)
        memcpy(&bv[coff], src, n)
        return buf

    cdef _old_content(self, int64_t c, unsigned char[::1] out, object fill):
        """What cluster c reads now, into out (one cluster)."""
        cdef uint64_t e = self.cmap.l2_entry(c)
        cdef int kind = self.cmap.kind(e)
        cdef int64_t cs = self.cluster_size
        cdef int64_t vc = c << self.cluster_bits
        cdef int64_t want = min(cs, self.size - vc)
        if kind == KIND_UNALLOC:
            memset(&out[0], 0, cs)
            if fill is not None and want > 0:
                fill(vc, out[:want])
        elif kind == KIND_ZERO:
            memset(&out[0], 0, cs)
        elif kind == KIND_COMPRESSED:
            self.read_layer(vc, &out[0], cs, kind, 0)
        elif self.external_data:
            self.read_layer(vc, &out[0], cs, kind, vc)
        else:
            self.file.read_full(&out[0], cs, e & OFFSET_MASK)

    cdef _write_ext(self, int64_t vaddr, const unsigned char[::1] src, object fill):
        """``write`` of an image with an external data file: every data cluster lives
        there at its guest offset (QEMU's docs/interop/qcow2.rst, "Header", incompatible
        bit 2), so a cluster that holds data is written in place, and one that does not
        is written whole (head and tail from what it reads now) and then linked to its
        own offset, which needs no cluster of the image file; the link is written at the
        next flush point, after a sync that covers the data file."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t n = src.shape[0], pos = 0, v, c, coff, run_n, k, i, wlen
        cdef uint64_t e2
        cdef bytearray buf
        cdef unsigned char[::1] bv
        if self.data_file is None:
            raise _fmt_err(self.file.path, "its external data file is not open")
        while pos < n:
            v = vaddr + pos
            c = v >> self.cluster_bits
            coff = v & (cs - 1)
            run_n = min(cs - coff, n - pos)
            if self.cmap.kind(self.cmap.l2_entry(c)) == KIND_DATA:
                while pos + run_n < n and self.cmap.kind(
                        self.cmap.l2_entry((v + run_n) >> self.cluster_bits)) == KIND_DATA:
                    run_n += min(cs, n - pos - run_n)
                self.guest_dirty = True
                self.data_file.write_full(&src[pos], run_n, v)
                pos += run_n
                continue
            k = 1
            while pos + (k * cs - coff) < n and k < 256 and self.cmap.kind(
                    self.cmap.l2_entry(c + k)) != KIND_DATA:
                k += 1
            run_n = min(k * cs - coff, n - pos)
            buf = self._run_buffer(c, k, coff, &src[pos], run_n, fill)
            bv = buf
            self.ensure_tables(c << self.cluster_bits, k * cs)     # tables before data
            wlen = min(k * cs, self.size - (c << self.cluster_bits))
            self.guest_dirty = True
            self.data_file.write_full(&bv[0], wlen, c << self.cluster_bits)
            for i in range(k):
                e2 = self.cmap.l2_entry(c + i)
                self._replace(c + i, (<uint64_t>(c + i) << self.cluster_bits) | COPIED)
                self.fresh.append((c + i, (c + i) << self.cluster_bits, e2))
            pos += run_n

    cdef _set_l2(self, int64_t c, uint64_t e):
        cdef Table t = self._l2_for_write(c >> self.l2_bits)
        t.put(c & (self.l2_entries - 1), e)

    cdef _replace(self, int64_t c, uint64_t newe):
        """Point cluster c at newe, dropping what it referenced before."""
        cdef Table t = self._l2_for_write(c >> self.l2_bits)
        cdef int64_t i = c & (self.l2_entries - 1)
        cdef uint64_t old = t.get(i)
        t.put(i, newe)
        drop = self._held_by(old)
        if drop is not None:
            self._drop_ref(drop[0], drop[1])
        if old & COMPRESSED_FLAG and c == self.cmap.last_comp_vcluster:
            self.cmap.last_comp_vcluster = -1

    cpdef tuple pull_status(self, int64_t vaddr, int64_t n):
        """Like block_status, but a cluster that any internal snapshot lacks counts as
        unallocated: the pull fills the snapshots too."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t c, run, k, i
        cdef int kind
        if self.extended_l2:
            return self.ext_pull_status(vaddr, n)
        st = self.block_status(vaddr, n)
        if not self.snaps.l1s or st[0] == KIND_UNALLOC:
            return st
        kind, run, host = st
        c = vaddr >> self.cluster_bits
        k = (vaddr + run + cs - 1) >> self.cluster_bits
        for i in range(c, k):
            if self.snaps.lacks(i):
                if i == c:
                    return (KIND_UNALLOC, min(run, cs - (vaddr & (cs - 1))), 0)
                return (kind, (i << self.cluster_bits) - vaddr, host)
        return st

    cdef int64_t _link_views(self, int64_t c, uint64_t entry) except -1:
        """Put ``entry`` into every view (active L1 and each snapshot's) that lacks
        cluster c; an L2 table shared by several views takes it in place, since each of
        them lacked it. Returns the number of references made.

        Every table that is missing is made first (empty, so harmless if what follows
        fails), then the entries are put without allocating: a failed allocation (a full
        disk) leaves no view pointing at the cluster."""
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t refs = 0, off
        cdef Table t
        cdef set done = set()
        self._tables_for(l1i)
        if l1i < self.l1_size:
            off = self.l1.get(l1i) & OFFSET_MASK
            t = self.cmap.load_l2(off)
            if t.get(i2) == 0:
                t.put(i2, entry)
                refs += self.snaps.l2_refs.get(off, 1)
            done.add(off)
        return refs + self.snaps.put_entry(c, entry, done)

    cpdef bint link(self, int64_t vaddr, int64_t host) except -1:
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef int64_t refs, k
        if self.external_data and host != (c << self.cluster_bits):
            raise ValueError("a data cluster of %s links only its guest offset 0x%x, not 0x%x"
                             % (self.file.path, c << self.cluster_bits, host))
        if self.snaps.l1s:
            self.snaps.views_fit(c, self.cmap.l2_entry(c) == 0, self.rc.rc_max, self.file.path)
        if self.extended_l2:
            return self.ext_link(vaddr, host)
        self._bound_dirty()
        if not self.snaps.l1s:
            if self.cmap.l2_entry(c) != 0:
                return False
            self._set_l2(c, <uint64_t>host | COPIED)
            self.fresh.append((c, host, None))
            return True
        refs = self._link_views(c, <uint64_t>host)
        if refs == 0:
            return False
        self.fresh.append((c, host, None))
        for k in range(refs - 1):
            self.rc.add(host >> self.cluster_bits, 1)
        if refs == 1 and (self.cmap.l2_entry(c) & OFFSET_MASK) == <uint64_t>host:
            self._set_l2(c, <uint64_t>host | COPIED)
        return True

    def link_compressed(self, int64_t vaddr, uint64_t entry):
        """Link the cluster at ``vaddr`` (bytes) to the compressed descriptor ``entry``
        (QEMU's docs/interop/qcow2.rst, "Compressed Clusters Descriptor") if the top still
        lacks it; the bytes it names are written and counted by the caller
        (blockpull._q2keep.Packer). False when the cluster is filled already. Raises
        ValueError on an image with internal snapshots or extended L2 entries."""
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef uint64_t coff, clen
        if self.snaps.l1s or self.extended_l2:
            raise ValueError("compressed clusters are linked only into an image without "
                             "internal snapshots or extended L2 entries")
        self._bound_dirty()
        if self.cmap.l2_entry(c) != 0:
            return False
        self._set_l2(c, entry)
        self.fresh.append((c, <int64_t>entry, None))
        comp_extent(entry, self.cluster_bits, &coff, &clen)
        if <int64_t>(coff + clen) > self.rc.file_size:
            self.rc.file_size = coff + clen    # written by the caller: reads may reach it
        return True

    cpdef bint link_zero(self, int64_t vaddr) except -1:
        cdef int64_t c = vaddr >> self.cluster_bits
        if self.extended_l2:
            return self.ext_link_zero(vaddr)
        if self.version < 3:
            raise ValueError("qcow2 v2 has no zero clusters")
        self._bound_dirty()
        if not self.snaps.l1s:
            if self.cmap.l2_entry(c) != 0:
                return False
            self._set_l2(c, ZERO_FLAG)
            return True
        return self._link_views(c, ZERO_FLAG) > 0

    def write_zeroes(self, int64_t vaddr, int64_t n, object fill, bint backed):
        """Make [vaddr, vaddr+n) read zeros: zero flags for whole clusters on v3,
        zero data elsewhere (and on v2 where a backing file would show through). A
        cluster covered in part counts as covered whole where QEMU makes it a zero
        cluster: unallocated or zero, the rest of it reading zeros already (``fill``,
        a ChainFill, says for the chain below; blockpull._q2zero). A guest write: it
        sets the enabled persistent bitmaps' bits for the whole range, as QEMU does.
        Raises ValueError for a range outside the virtual size."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t end = vaddr + n, v = vaddr, c, nxt
        cdef uint64_t e
        cdef bint whole
        cdef int kind
        if vaddr < 0 or n < 0 or vaddr + n > self.size:
            raise ValueError("write_zeroes [%d, %d) outside the virtual size %d" % (vaddr, vaddr + n, self.size))
        if n:
            self._bound_dirty()
            self._autoclear()
            self._bitmaps_mark(vaddr, n)
        if self.header.data_file_raw:
            # the data file stays a raw image of the guest: zeros are written there
            while v < end:
                nxt = min(v + 256 * cs, end)
                self.write(v, bytes(nxt - v), fill)
                v = nxt
            return
        if self.extended_l2:
            ext_write_zeroes(self, vaddr, n, fill)
            return
        while v < end:
            c = v >> self.cluster_bits
            nxt = min((c + 1) << self.cluster_bits, end)
            whole = (v & (cs - 1)) == 0 and (nxt - v == cs or nxt == self.size)
            if not whole and (self.version == 3 or not backed):
                kind = self.cmap.kind(self.cmap.l2_entry(c))
                whole = zero_unit_whole(kind, c * cs, min((c + 1) * cs, self.size),
                                        v, nxt, fill)
                if whole and kind == KIND_ZERO:
                    v = nxt             # a zero cluster already: left as it is
                    continue
            if whole:
                e = self.cmap.l2_entry(c)
                self._entry_ok(c, e)
                if self.version == 3:
                    if e != ZERO_FLAG:
                        self._replace(c, ZERO_FLAG)
                    v = nxt
                    continue
                if e == 0 and not backed:
                    v = nxt
                    continue
            self.write(v, bytes(nxt - v), fill)
            v = nxt

    # ---- backing link ---------------------------------------------------------------

    def set_backing(self, name, fmt):
        """Point the image at backing ``name`` of format ``fmt`` (or at none) crash-safely,
        after everything written so far is durable (see ``Header.set_backing``). Raises
        ValueError for a name the header cannot hold, OSError when a write or sync fails."""
        self.sync_all()
        self.header.set_backing(self.file, name, fmt, lambda: self._sync())
        self._take_names()

    # ---- introspection ------------------------------------------------------------

    @property
    def rt_offset(self):
        """Where the refcount table is (bytes)."""
        return self.rc.table.offset

    @property
    def rt_clusters(self):
        """The refcount table's size in clusters."""
        return self.rc.clusters

    @property
    def next_free(self):
        """The first host cluster new allocations look at."""
        return self.rc.next_free

    def info(self):
        return {
            "version": self.version, "cluster_size": self.cluster_size,
            "refcount_bits": 1 << self.refcount_order, "snapshots": self.nb_snapshots,
            "compression_type": "zstd" if self.compression_type == 1 else "zlib",
            "incompatible": self.incompatible, "compatible": self.compatible,
            "autoclear": self.autoclear,
        }


