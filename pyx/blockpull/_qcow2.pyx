# cython: language_level=3
"""qcow2 (versions 2 and 3): header, L1/L2 translation, refcounts, allocation, ordering.

Tables live in memory in their on-disk (big-endian) form so that they can be written
back without conversion. The L2 and refcount-block caches are bounded. Metadata is
written back in an order that survives a crash (data before reference, refcount before
reference; docs/formats.md, "Write ordering"):

0. tables before data: the L2 tables a range needs are made, and new metadata clusters
   have their space claimed, before its data clusters are reserved, so that a full disk
   fails an allocation rather than the write-back of what is already linked;
1. data clusters are written by the caller (``write`` / the stream loop);
2. ``flush_metadata``: refcount blocks and brand-new L2 tables are written, fdatasync;
   new refcount-table entries (rare) are written, fdatasync; then the L2 tables and L1
   entries that point at the synced clusters are written; the next fdatasync covers them;
3. reference drops (copy-on-write of shared clusters, overwritten compressed clusters)
   decrement refcounts only after the new reference is durable;
4. a failed fdatasync makes everything written since the last good one count as not
   written (``_sync_failed``): it is written again, or unlinked and copied again.

A crash at any instant therefore leaves at worst leaked clusters, never a reference to a
cluster whose data or count is not on disk.
"""
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t
from libc.string cimport memcpy, memset, memcmp
from libc.stdlib cimport malloc, free, calloc
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

from blockpull._fileio cimport File
from blockpull._endian cimport ld_be64 as ld64, st_be64 as st64
from blockpull._driver cimport (Driver, KIND_UNALLOC, KIND_DATA, KIND_ZERO,
                                KIND_COMPRESSED)
from blockpull._tablecache cimport Table, TableCache
from blockpull._q2compress cimport Decompressor, comp_extent
import errno as _errno

from blockpull.errors import ImageFormatError
from blockpull._bitmaps import Bitmaps, AUTOCLEAR_BITMAPS
from blockpull._q2header import (Header, MAGIC, EXT_END, EXT_BACKING_FORMAT,
                                 EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE,
                                 INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE,
                                 INCOMPAT_COMPRESSION, INCOMPAT_EXTL2, KNOWN_INCOMPAT,
                                 FEATURE_NAMES, MAX_REFTABLE_BYTES, create, probe)

cdef uint64_t OFFSET_MASK = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t COPIED = 1ULL << 63
cdef uint64_t COMPRESSED_FLAG = 1ULL << 62
cdef uint64_t ZERO_FLAG = 1ULL

cdef int64_t L2_CACHE_BYTES = 32 * 1024 * 1024
cdef int64_t RB_CACHE_BYTES = 16 * 1024 * 1024

def _fmt_err(path, msg):
    return ImageFormatError("%s: %s" % (path, msg))


def _lost_error(path, exc):
    """The error every flush raises after a failed fdatasync lost guest writes."""
    import errno as _errno
    return OSError(_errno.EIO, "an earlier fdatasync failed (%s): writes made before it "
                   "may not be on disk, and no later flush can make them so; close the "
                   "image and check what was written since the last successful flush"
                   % (getattr(exc, "strerror", None) or exc), path)


cdef class Qcow2(Driver):
    """A qcow2 image file (v2 or v3)."""
    cdef readonly int version
    cdef readonly int refcount_order
    cdef readonly int64_t l1_offset
    cdef readonly int64_t l1_size
    cdef readonly int64_t rt_offset
    cdef readonly int64_t rt_clusters
    cdef readonly uint64_t incompatible
    cdef readonly uint64_t compatible
    cdef readonly uint64_t autoclear
    cdef readonly int header_length
    cdef readonly int nb_snapshots
    cdef readonly int64_t snapshots_offset
    cdef readonly int compression_type
    cdef readonly list extensions
    cdef readonly int64_t backing_offset
    cdef readonly int backing_size
    cdef int l2_bits
    cdef int64_t l2_entries
    cdef readonly bint extended_l2   # 128-bit L2 entries with subcluster bitmaps
    cdef int sc_bits              # log2 of the subcluster size (extended L2 only)
    cdef int rb_bits
    cdef int64_t rb_entries
    cdef uint64_t rc_max
    cdef Table l1
    cdef Table reftable
    cdef TableCache l2_cache      # L2 tables by host offset
    cdef TableCache rb_cache      # refcount blocks by refcount table index
    cdef int64_t l2_cache_bytes
    cdef set l1_dirty             # dirty L1 indexes
    cdef set rt_dirty             # reftable indexes that point at new blocks
    cdef bint rt_moved
    cdef tuple rt_old             # (offset, clusters) of a replaced reftable
    cdef bint rt_unsynced         # reftable or header written, not yet synced
    cdef readonly int64_t next_free
    cdef readonly int64_t syncs
    cdef list free_waiting        # reference dropped in memory, not yet written
    cdef list free_after_sync     # reference drop written, durable after the next sync
    cdef bint autoclear_done
    cdef readonly object bitmaps  # Bitmaps kept up to date (writable, autoclear bit 0), or None
    cdef readonly bint metadata_only
    cdef readonly int crypt_method
    cdef readonly tuple crypto_header  # (offset, length) of the LUKS header area, or None
    cdef int64_t file_size
    cdef Decompressor decomp
    cdef int64_t last_comp_vcluster
    cdef bytes last_comp_data
    cdef public object lock
    cdef readonly object header   # the parsed header (blockpull._q2header.Header)
    cdef list snap_l1             # each internal snapshot's L1 table (Table), or []
    cdef list snap_l1_dirty       # dirty entry indexes per snapshot L1
    cdef dict l2_refs             # with snapshots: L2 offset -> L1 entries pointing at it
    # since the last good fdatasync (see _sync_failed):
    cdef list fresh               # (cluster, host, old entry or None for a link) with new data
    cdef list wrote_l2            # L2 tables written
    cdef list wrote_rb            # (index, refcount block) written
    cdef set wrote_l1             # active L1 indexes written
    cdef dict wrote_snap          # snapshot index -> its L1 indexes written
    cdef set wrote_rt             # refcount table indexes written
    cdef bint wrote_rt_header     # the header switched to a grown refcount table
    cdef bint rt_header_redo      # that switch must be written again
    cdef bint guest_dirty         # guest data written
    cdef readonly int64_t sync_failures
    cdef object guest_lost        # the failed sync's OSError, once guest data was lost

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
        self.rt_dirty = set()
        self.free_waiting = []
        self.free_after_sync = []
        self.last_comp_vcluster = -1
        self._synced()
        self._parse()

    # ---- header -----------------------------------------------------------------

    def _parse(self):
        self.file_size = self.file.size()
        h = Header.read(self.file, self.file_size, self.writable, self.metadata_only)
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
        self.sc_bits = self.cluster_bits - 5
        self.l2_entries = 1 << self.l2_bits
        self.rb_bits = self.cluster_bits + 3 - self.refcount_order
        self.rb_entries = 1LL << self.rb_bits
        self.rc_max = (1ULL << (1 << self.refcount_order)) - 1 if self.refcount_order < 6 else <uint64_t>-1
        self.l1_offset = h.l1_offset
        self.l1_size = h.l1_size
        self.l1 = Table(self.l1_offset, self.l1_size * 8)
        if self.l1_size:
            self.file.read_full(self.l1.buf, self.l1_size * 8, self.l1_offset)
        self.rt_offset = h.rt_offset
        self.rt_clusters = h.rt_clusters
        self.reftable = Table(self.rt_offset, self.rt_clusters * self.cluster_size)
        self.file.read_full(self.reftable.buf, self.reftable.nbytes, self.rt_offset)
        self.has_zero_flag = self.version == 3
        self.l2_cache = TableCache(max(16, self.l2_cache_bytes // self.cluster_size))
        self.rb_cache = TableCache(max(16, RB_CACHE_BYTES // self.cluster_size))
        self.next_free = (self.file_size + self.cluster_size - 1) >> self.cluster_bits
        self.autoclear_done = (self.autoclear & ~AUTOCLEAR_BITMAPS) == 0
        self._load_snapshots()
        if self.file.is_device:
            # a device is "file" to its end: what the image uses ends at its last
            # counted cluster, and new clusters go after it, up to the device's end
            self.next_free = self._counted_end()
        self.bitmaps = None
        if self.writable and self.version == 3 and self.autoclear & AUTOCLEAR_BITMAPS:
            for (etype, data, off) in self.extensions:
                if etype == EXT_BITMAPS:
                    self.bitmaps = Bitmaps(self.file, bytes(data), self.cluster_bits,
                                           self.size, self.file_size, self.refcount)
                    break

    def _take_names(self):
        """The backing link and the extensions, as the header now names them."""
        h = self.header
        self.extensions = h.extensions
        self.backing_name = h.backing_name
        self.backing_format = h.backing_format
        self.backing_offset = h.backing_offset
        self.backing_size = h.backing_size

    cdef int64_t _counted_end(self) except -1:
        """One past the last host cluster whose refcount is not zero."""
        cdef int64_t idx, i
        cdef Table t
        for idx in range((self.reftable.nbytes >> 3) - 1, -1, -1):
            t = self._refblock(idx, False)
            if t is None:
                continue
            for i in range(self.rb_entries - 1, -1, -1):
                if self._rc_get_in(t, i) != 0:
                    return (idx << self.rb_bits) + i + 1
        return 1

    def _load_snapshots(self):
        """Read every internal snapshot's L1 table (named by the header's one parse of
        the snapshot table, which checked them). A pull fills what the snapshots lack
        too, since their unallocated clusters read the same backing chain."""
        cdef int64_t i, e
        cdef Table t
        self.snap_l1 = []
        self.snap_l1_dirty = []
        self.l2_refs = {}
        for (l1_off, l1_size, _sid, _name, _pos) in self.header.snapshots:
            t = Table(l1_off, l1_size * 8)
            if l1_size:
                self.file.read_full(t.buf, l1_size * 8, l1_off)
            self.snap_l1.append(t)
            self.snap_l1_dirty.append(set())
        if not self.snap_l1:
            return
        for t in [self.l1] + self.snap_l1:
            for i in range(t.nbytes >> 3):
                e = t.get(i) & OFFSET_MASK
                if e:
                    self.l2_refs[e] = self.l2_refs.get(e, 0) + 1

    # ---- tables -----------------------------------------------------------------

    cdef Table _load_l2(self, int64_t off):
        cdef Table t = self.l2_cache.get(off)
        if t is not None:
            return t
        if off % self.cluster_size or off + self.cluster_size > max(self.file_size, self.next_free << self.cluster_bits):
            raise _fmt_err(self.file.path, "L2 table offset 0x%x invalid" % off)
        t = Table(off, self.cluster_size)
        self.file.read_full(t.buf, self.cluster_size, off)
        self._cache_put_l2(t)
        return t

    cdef int _cache_put_l2(self, Table t) except -1:
        """Keep L2 table ``t``; only clean tables make room (nothing is written here)."""
        self.l2_cache.put(t.offset, t)
        return 0

    cdef int _bound_dirty(self) except -1:
        """On the write path, before a change: when dirty tables hold either cache over
        its budget, run a flush point (``flush_metadata``) so that they can be dropped.
        Lookups never do this: a read or a map never writes or syncs."""
        if self.l2_cache.excess() or self.rb_cache.excess():
            self.flush_metadata()
            self.l2_cache.drop_clean()
            self.rb_cache.drop_clean()
        return 0

    cdef inline uint64_t _l2_entry(self, int64_t cluster) except? 0xFFFFFFFFFFFFFFFF:
        cdef int64_t l1i = cluster >> self.l2_bits
        cdef uint64_t l1e
        cdef int64_t l2off
        if l1i >= self.l1_size:
            return 0
        l1e = self.l1.get(l1i)
        l2off = l1e & OFFSET_MASK
        if l2off == 0:
            return 0
        return self._load_l2(l2off).get((cluster & (self.l2_entries - 1)) << self.extended_l2)

    cpdef tuple block_status(self, int64_t vaddr, int64_t n):
        cdef int64_t cs = self.cluster_size
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef int64_t inoff = vaddr & (cs - 1)
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t l2i, run, i, limit, uoff, host0 = 0, h2 = 0
        cdef int kind, k2, ubits, per, sub
        cdef Table t
        if vaddr >= self.size:
            return (KIND_UNALLOC, n, 0)
        limit = min(n, self.size - vaddr)
        if l1i >= self.l1_size or (self.l1.get(l1i) & OFFSET_MASK) == 0:
            # skip every unallocated L1 range at once: cost follows the data
            i = l1i + 1
            while i < self.l1_size and (self.l1.get(i) & OFFSET_MASK) == 0 and \
                    ((i << (self.l2_bits + self.cluster_bits)) - vaddr) < limit:
                i += 1
            run = (i << (self.l2_bits + self.cluster_bits)) - vaddr
            return (KIND_UNALLOC, min(run, limit), 0)
        t = self._load_l2(self.l1.get(l1i) & OFFSET_MASK)
        l2i = c & (self.l2_entries - 1)
        if self.extended_l2:
            ubits = self.sc_bits
            per = 32
            sub = (vaddr >> ubits) & 31
        else:
            ubits = self.cluster_bits
            per = 1
            sub = 0
        kind = self._unit(t, c, l2i, sub, &host0)
        if kind == KIND_COMPRESSED:
            return (KIND_COMPRESSED, min(cs - inoff, limit), 0)
        uoff = vaddr & ((1LL << ubits) - 1)
        run = (1LL << ubits) - uoff
        while run < limit:
            sub += 1
            if sub == per:
                sub = 0
                l2i += 1
                if l2i == self.l2_entries:
                    break
            k2 = self._unit(t, (vaddr + run) >> self.cluster_bits, l2i, sub, &h2)
            if k2 != kind or (h2 == 0) != (host0 == 0):
                break
            if host0 and h2 != host0 + uoff + run:
                break
            run += 1LL << ubits
        return (kind, min(run, limit), (host0 + uoff) if host0 else 0)

    cdef int _unit(self, Table t, int64_t c, int64_t l2i, int sub, int64_t* host) except -1:
        """Kind of cluster ``c`` (entry ``l2i`` of L2 table ``t``) or, with extended L2
        entries, of its subcluster ``sub``; ``host`` gets the host offset of that unit
        wherever the image has one (data, preallocated zeros, allocated subclusters that
        are not in use) and 0 elsewhere, as ``qemu-img map`` reports it."""
        cdef uint64_t e, bm, off
        cdef int kind
        if not self.extended_l2:
            e = t.get(l2i)
            kind = self._kind(e)
            off = e & OFFSET_MASK
            if kind == KIND_COMPRESSED or kind == KIND_UNALLOC:
                host[0] = 0
                return kind
            if off & (self.cluster_size - 1):
                raise _fmt_err(self.file.path, "L2 entry for cluster %d points at unaligned offset 0x%x" % (c, off))
            if off and off + self.cluster_size > self._host_end():
                raise _fmt_err(self.file.path, "L2 entry for cluster %d points past the end of "
                               "the file (0x%x)" % (c, off))
            host[0] = off
            return kind
        e = t.get(2 * l2i)
        bm = t.get(2 * l2i + 1)
        host[0] = 0
        if e & COMPRESSED_FLAG:
            return KIND_COMPRESSED
        off = e & OFFSET_MASK
        if off & (self.cluster_size - 1):
            raise _fmt_err(self.file.path, "L2 entry for cluster %d points at unaligned offset 0x%x" % (c, off))
        if off and off + self.cluster_size > self._host_end():
            raise _fmt_err(self.file.path, "L2 entry for cluster %d points past the end of "
                           "the file (0x%x)" % (c, off))
        if (bm >> 32) & bm & 0xFFFFFFFFULL:
            raise _fmt_err(self.file.path, "extended L2 entry for cluster %d marks subclusters "
                           "both allocated and zero (bitmap 0x%016x)" % (c, bm))
        if off == 0 and bm & 0xFFFFFFFFULL:
            raise _fmt_err(self.file.path, "extended L2 entry for cluster %d has allocated "
                           "subclusters but no host offset" % c)
        if off:
            host[0] = off + (<uint64_t>sub << self.sc_bits)
        if bm & (1ULL << (32 + sub)):
            return KIND_ZERO
        if bm & (1ULL << sub):
            return KIND_DATA
        return KIND_UNALLOC

    cdef inline uint64_t _host_end(self) noexcept:
        """End of the host space a table may point into: the file, plus what this driver
        has allocated since it was opened."""
        return max(self.file_size, self.next_free << self.cluster_bits)

    cdef inline int _kind(self, uint64_t e) noexcept:
        if e & COMPRESSED_FLAG:
            return KIND_COMPRESSED
        if self.version == 3 and (e & ZERO_FLAG) and not self.extended_l2:
            return KIND_ZERO
        if e & OFFSET_MASK:
            return KIND_DATA
        return KIND_UNALLOC

    cdef int read_layer(self, int64_t vaddr, unsigned char* out, int64_t n, int kind,
                        int64_t host) except -1:
        cdef int64_t cs = self.cluster_size
        cdef int64_t inoff, c
        cdef bytes plain
        if kind == KIND_DATA:
            self.file.read_full(out, n, host)
        elif kind == KIND_ZERO:
            memset(out, 0, n)
        elif kind == KIND_COMPRESSED:
            c = vaddr >> self.cluster_bits
            inoff = vaddr & (cs - 1)
            if inoff + n > cs:
                raise ValueError("compressed read crosses a cluster")
            plain = self._decompress(c)
            memcpy(out, PyBytes_AS_STRING(plain) + inoff, n)
        else:
            raise ValueError("read_layer of an unallocated range")
        return 0

    cdef bytes _decompress(self, int64_t c):
        """What compressed virtual cluster ``c`` holds (the last one is kept)."""
        cdef uint64_t coff, clen
        if c == self.last_comp_vcluster:
            return self.last_comp_data
        comp_extent(self._l2_entry(c), self.cluster_bits, &coff, &clen)
        if coff >= <uint64_t>self.file_size:
            raise _fmt_err(self.file.path, "compressed cluster %d lies past the end of the file" % c)
        clen = min(clen, self.file_size - coff)
        if self.decomp is None:
            self.decomp = Decompressor(self.cluster_size, self.compression_type, self.file.path)
        plain = self.decomp.decompress(self.file.pread(coff, clen), c)
        self.last_comp_vcluster = c
        self.last_comp_data = plain
        return plain

    # ---- refcounts ----------------------------------------------------------------

    cdef Table _refblock(self, int64_t idx, bint create):
        cdef Table t = self.rb_cache.get(idx)
        cdef uint64_t e
        cdef int64_t off
        if t is not None:
            return t
        if idx >= (self.reftable.nbytes >> 3):
            return None
        e = self.reftable.get(idx)
        off = e & ~(<uint64_t>0x1FF)
        if off == 0:
            return None
        if off % self.cluster_size:
            raise _fmt_err(self.file.path, "refcount block offset 0x%x is not aligned" % off)
        if <uint64_t>off + self.cluster_size > self._host_end():
            raise _fmt_err(self.file.path, "refcount block %d at 0x%x lies past the end of the "
                           "file" % (idx, off))
        t = Table(off, self.cluster_size)
        self.file.read_full(t.buf, self.cluster_size, off)
        self.rb_cache.put(idx, t)
        return t

    cdef uint64_t _rc_get_in(self, Table t, int64_t i) noexcept:
        cdef int order = self.refcount_order
        cdef int bits
        cdef int64_t byte, shift
        cdef uint64_t v = 0
        cdef int k
        if order == 4:
            return (<uint64_t>t.buf[2 * i] << 8) | t.buf[2 * i + 1]
        if order >= 3:
            bits = 1 << order
            for k in range(bits >> 3):
                v = (v << 8) | t.buf[i * (bits >> 3) + k]
            return v
        bits = 1 << order
        byte = (i * bits) >> 3
        shift = (i * bits) & 7
        return (t.buf[byte] >> shift) & ((1 << bits) - 1)

    cdef void _rc_set_in(self, Table t, int64_t i, uint64_t v) noexcept:
        cdef int order = self.refcount_order
        cdef int bits, k, nb
        cdef int64_t byte, shift
        cdef unsigned char mask
        if order >= 3:
            bits = 1 << order
            nb = bits >> 3
            for k in range(nb - 1, -1, -1):
                t.buf[i * nb + k] = v & 0xFF
                v >>= 8
        else:
            bits = 1 << order
            byte = (i * bits) >> 3
            shift = (i * bits) & 7
            mask = ((1 << bits) - 1) << shift
            t.buf[byte] = (t.buf[byte] & ~mask) | ((v << shift) & mask)
        t.dirty = True

    def refcount(self, int64_t cluster):
        """Refcount of host cluster ``cluster`` (0 where no refcount block covers it)."""
        cdef Table t = self._refblock(cluster >> self.rb_bits, False)
        if t is None:
            return 0
        return self._rc_get_in(t, cluster & (self.rb_entries - 1))

    cdef int _rc_add(self, int64_t cluster, int delta) except -1:
        cdef Table t = self._refblock(cluster >> self.rb_bits, False)
        cdef uint64_t v
        if t is None:
            if delta < 0:
                raise _fmt_err(self.file.path, "freeing cluster %d that has no refcount block" % cluster)
            raise RuntimeError("refcount block missing for cluster %d" % cluster)
        v = self._rc_get_in(t, cluster & (self.rb_entries - 1))
        if delta < 0 and v == 0:
            raise _fmt_err(self.file.path, "refcount of cluster %d would drop below zero" % cluster)
        if delta > 0 and v >= self.rc_max:
            raise _fmt_err(self.file.path, "refcount of cluster %d would overflow" % cluster)
        self._rc_set_in(t, cluster & (self.rb_entries - 1), v + delta)
        return 0

    cdef int _ensure_reftable(self, int64_t idx) except -1:
        """Grow the in-memory refcount table so that entry ``idx`` exists. The new table
        is written and switched to at the next flush."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t entries = self.reftable.nbytes >> 3
        cdef int64_t new_entries, new_clusters, start, c
        cdef Table nt
        if idx < entries:
            return 0
        new_entries = max(idx + 1, entries) * 2
        new_clusters = (new_entries * 8 + cs - 1) // cs
        if new_clusters * cs > MAX_REFTABLE_BYTES:
            raise _fmt_err(self.file.path, "image too large: refcount table would exceed %d bytes" % MAX_REFTABLE_BYTES)
        nt = Table(0, new_clusters * cs)
        memcpy(nt.buf, self.reftable.buf, self.reftable.nbytes)
        start = self._reserve(new_clusters)
        nt.offset = start << self.cluster_bits
        if not self.rt_moved:
            self.rt_old = (self.rt_offset, self.rt_clusters)
        else:
            # an unwritten replacement is replaced again: give its clusters back
            self._free_now(self.rt_offset >> self.cluster_bits, self.rt_clusters)
        self.reftable = nt
        self.rt_offset = nt.offset
        self.rt_clusters = new_clusters
        self.rt_moved = True
        for c in range(start, start + new_clusters):
            self._count_new(c)
        return 0

    cdef int _count_new(self, int64_t c) except -1:
        """Set refcount 1 on a just-reserved cluster, creating its refcount block."""
        cdef int64_t idx = c >> self.rb_bits
        cdef Table rb = self._refblock(idx, False)
        cdef int64_t b
        if rb is None:
            self._ensure_reftable(idx)
            b = self._reserve(1)
            rb = Table(b << self.cluster_bits, self.cluster_size)
            rb.new = True
            rb.dirty = True
            self.rb_cache.put(idx, rb)
            self.reftable.put(idx, <uint64_t>(b << self.cluster_bits))
            self.rt_dirty.add(idx)
            self._count_new(b)
        self._rc_add(c, 1)
        return 0

    cdef int64_t _find_free(self, int64_t n) except -1:
        """First cluster of a run of ``n`` free clusters at or after ``next_free``.

        Clusters past the end of the file are usually free, but not always: a crash can
        leave a refcount block durable while the data it counts never reached the file
        (a leak past the end). Counting such a cluster again would give it two counts
        for one reference, so every candidate's refcount is looked at."""
        cdef int64_t start = self.next_free
        cdef int64_t c = start
        cdef Table t
        while c < start + n:
            t = self._refblock(c >> self.rb_bits, False)
            if t is not None and self._rc_get_in(t, c & (self.rb_entries - 1)) != 0:
                start = c + 1
            c += 1
        if self.file.is_device and (start + n) << self.cluster_bits > self.file_size:
            # a device cannot grow
            raise OSError(_errno.ENOSPC, "no space left on block device: %d clusters at "
                          "0x%x pass its end (%d bytes)" % (n, start << self.cluster_bits,
                                                            self.file_size), self.file.path)
        return start

    cdef int64_t _reserve(self, int64_t n) except -1:
        """Take ``n`` free contiguous clusters for metadata (not yet counted), with their
        space claimed on the file system (see ``_claim``)."""
        cdef int64_t start = self._find_free(n)
        cdef int64_t old = self.next_free
        self.next_free = start + n
        try:
            self._claim(start, n)
        except OSError:
            self.next_free = old
            raise
        return start

    cdef int _claim(self, int64_t c, int64_t n) except -1:
        """Write zeros over metadata clusters ``c .. c+n`` as soon as they are reserved.
        Metadata is written back later, in ``flush_metadata``; on a full file system
        that write-back must not be the write that fails, or everything linked in
        memory since the last flush is lost with it. Claimed now, the space is there when
        the tables are written (and a full disk fails the allocation instead, before
        anything depends on it). Nothing points at these clusters yet."""
        cdef bytes z = bytes(n << self.cluster_bits)
        self.file.write_full(z, n << self.cluster_bits, c << self.cluster_bits)
        return 0

    cdef int64_t _alloc_table(self) except -1:
        """One counted cluster for a new L2 table, its space claimed; given back if the
        claim fails."""
        cdef int64_t off = self.alloc_clusters(1)
        try:
            self._claim(off >> self.cluster_bits, 1)
        except OSError:
            self.free_clusters(off, 1)
            raise
        return off

    cpdef int64_t alloc_clusters(self, int64_t n) except -1:
        cdef int64_t start, c
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        self._autoclear()
        # refcount blocks for the range may themselves need clusters: reserve those first
        while True:
            start = self._find_free(n)
            for c in range(start, start + n):
                if self._refblock(c >> self.rb_bits, False) is None:
                    break
            else:
                break
            self._count_new_block_for(c >> self.rb_bits)
        self.next_free = start + n
        for c in range(start, start + n):
            self._rc_add(c, 1)
        return start << self.cluster_bits

    cdef int _count_new_block_for(self, int64_t idx) except -1:
        cdef int64_t b
        cdef Table rb
        self._ensure_reftable(idx)
        if self._refblock(idx, False) is not None:
            return 0
        b = self._reserve(1)
        rb = Table(b << self.cluster_bits, self.cluster_size)
        rb.new = True
        rb.dirty = True
        self.rb_cache.put(idx, rb)
        self.reftable.put(idx, <uint64_t>(b << self.cluster_bits))
        self.rt_dirty.add(idx)
        self._count_new(b)
        return 0

    cdef int _free_now(self, int64_t c, int64_t n) except -1:
        cdef int64_t i
        for i in range(c, c + n):
            self._rc_add(i, -1)
        return 0

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
        cdef int64_t si, newoff
        cdef Table sl1, nt
        if l1i < self.l1_size and (self.l1.get(l1i) & OFFSET_MASK) == 0:
            self._l2_for_write(l1i)
        for si in range(len(self.snap_l1)):
            sl1 = self.snap_l1[si]
            if l1i < (sl1.nbytes >> 3) and (sl1.get(l1i) & OFFSET_MASK) == 0:
                newoff = self._alloc_table()
                nt = Table(newoff, self.cluster_size)
                nt.new = True
                nt.dirty = True
                self._cache_put_l2(nt)
                sl1.put(l1i, <uint64_t>newoff)
                self.snap_l1_dirty[si].add(l1i)
                self.l2_refs[newoff] = 1
        return 0

    cpdef free_clusters(self, int64_t host, int64_t n):
        """Give back ``n`` clusters from ``alloc_clusters`` that were never linked: the
        count drops at once. When they were the last ones allocated, the file's tail of
        free clusters is cut off (never on a block device), so that space a failed
        write took (a full disk) is returned."""
        cdef int64_t c = host >> self.cluster_bits
        self._free_now(c, n)
        self._trim_tail()

    cdef int _trim_tail(self) except -1:
        """Lower ``next_free`` over the free clusters at the end of what was allocated
        and cut the file there. A cluster counted anywhere (in memory: data, tables,
        claimed metadata, a reference drop not yet durable) stops it."""
        cdef int64_t c = self.next_free
        cdef int64_t end
        cdef Table t
        while c > 1:
            t = self._refblock((c - 1) >> self.rb_bits, False)
            if t is not None and self._rc_get_in(t, (c - 1) & (self.rb_entries - 1)) != 0:
                break
            c -= 1
        if c == self.next_free:
            return 0
        self.next_free = c
        end = c << self.cluster_bits
        if self.file.is_device:
            return 0
        try:
            if self.file.size() > end:
                self.file.truncate(end)
                self.file_size = min(self.file_size, end)
        except OSError:
            pass    # the clusters are free all the same; the space comes back later
        return 0

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
        if self.version != 3 or not (self.autoclear & ~AUTOCLEAR_BITMAPS):
            return
        self.autoclear &= AUTOCLEAR_BITMAPS
        self.header.write_autoclear(self.file, self.autoclear)
        self._sync()

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
        cdef int64_t off, newoff
        cdef Table t, nt
        if l1i >= self.l1_size:
            raise _fmt_err(self.file.path, "write past the L1 table")
        l1e = self.l1.get(l1i)
        off = l1e & OFFSET_MASK
        if off == 0:
            newoff = self._alloc_table()
            nt = Table(newoff, self.cluster_size)
            nt.new = True
            nt.dirty = True
            self._cache_put_l2(nt)
            self.l1.put(l1i, <uint64_t>newoff | COPIED)
            self.l1_dirty.add(l1i)
            if self.snap_l1:
                self.l2_refs[newoff] = 1
            return nt
        t = self._load_l2(off)
        if l1e & COPIED:
            return t
        if self.refcount(off >> self.cluster_bits) == 1:
            self.l1.put(l1i, l1e | COPIED)
            self.l1_dirty.add(l1i)
            return t
        # shared with a snapshot: copy the table, never write the shared one
        newoff = self._alloc_table()
        nt = Table(newoff, self.cluster_size)
        memcpy(nt.buf, t.buf, self.cluster_size)
        nt.new = True
        nt.dirty = True
        self._cache_put_l2(nt)
        self.l1.put(l1i, <uint64_t>newoff | COPIED)
        self.l1_dirty.add(l1i)
        self._drop_ref(off >> self.cluster_bits, 1)
        if self.snap_l1:
            self.l2_refs[newoff] = 1
            self.l2_refs[off] = self.l2_refs.get(off, 1) - 1
        return nt

    cdef bint _writable_in_place(self, uint64_t e):
        cdef int64_t off = e & OFFSET_MASK
        if e & COMPRESSED_FLAG or off == 0:
            return False
        if self.version == 3 and e & ZERO_FLAG:
            return False
        if e & COPIED:
            return True
        return self.refcount(off >> self.cluster_bits) == 1

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
        pos = 0
        while pos < n:
            v = vaddr + pos
            c = v >> self.cluster_bits
            coff = v & (cs - 1)
            take = min(cs - coff, n - pos)
            e = self._l2_entry(c)
            if self._writable_in_place(e):
                # in place: extend over following clusters that are contiguous on the host
                host = (e & OFFSET_MASK) + coff
                run_n = take
                k = 1
                while pos + run_n < n:
                    e2 = self._l2_entry(c + k)
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
                e2 = self._l2_entry(c + k)
                if self._writable_in_place(e2):
                    break
                k += 1
            run_n = min(k * cs - coff, n - pos)
            buf = bytearray(k * cs)
            bv = buf
            # fill the head and tail clusters that the write covers only in part
            if coff:
                self._old_content(c, bv[:cs], fill)
            if (coff + run_n) & (cs - 1):
                self._old_content(c + k - 1, bv[(k - 1) * cs:], fill)
            memcpy(&bv[coff], &src[pos], run_n)
            self.ensure_tables(c << self.cluster_bits, k * cs)     # tables before data
            host = self.alloc_clusters(k)
            i = 0
            try:
                self.guest_dirty = True
                self.file.write_full(&bv[0], k * cs, host)
                while i < k:
                    e2 = self._l2_entry(c + i)
                    self._replace(c + i, <uint64_t>(host + i * cs) | COPIED)
                    self.fresh.append((c + i, host + i * cs, e2))
                    i += 1
            except OSError:
                # nothing points at the clusters not linked yet: give them back
                self.free_clusters(host + i * cs, k - i)
                raise
            pos += run_n

    cdef _old_content(self, int64_t c, unsigned char[::1] out, object fill):
        """What cluster c reads now, into out (one cluster)."""
        cdef uint64_t e = self._l2_entry(c)
        cdef int kind = self._kind(e)
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
        else:
            self.file.read_full(&out[0], cs, e & OFFSET_MASK)

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
        if old & COMPRESSED_FLAG and c == self.last_comp_vcluster:
            self.last_comp_vcluster = -1

    cdef object _held_by(self, uint64_t e):
        """The host clusters L2 entry ``e`` holds a reference to, as (first, count), or
        None: one data cluster, or every cluster a compressed cluster's bytes touch."""
        cdef uint64_t coff, clen
        if e & COMPRESSED_FLAG:
            comp_extent(e, self.cluster_bits, &coff, &clen)
            return (coff >> self.cluster_bits,
                    ((coff + clen - 1) >> self.cluster_bits) - (coff >> self.cluster_bits) + 1)
        if e & OFFSET_MASK:
            return ((e & OFFSET_MASK) >> self.cluster_bits, 1)
        return None

    cpdef tuple pull_status(self, int64_t vaddr, int64_t n):
        """Like block_status, but a cluster that any internal snapshot lacks counts as
        unallocated: the pull fills the snapshots too."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t c, run, k, i
        cdef int kind
        st = self.block_status(vaddr, n)
        if not self.snap_l1 or st[0] == KIND_UNALLOC:
            return st
        kind, run, host = st
        c = vaddr >> self.cluster_bits
        k = (vaddr + run + cs - 1) >> self.cluster_bits
        for i in range(c, k):
            if self._snap_lacks(i):
                if i == c:
                    return (KIND_UNALLOC, min(run, cs - (vaddr & (cs - 1))), 0)
                return (kind, (i << self.cluster_bits) - vaddr, host)
        return st

    cdef bint _snap_lacks(self, int64_t c) except -1:
        cdef int64_t l1i = c >> self.l2_bits
        cdef Table sl1
        cdef int64_t off
        for sl1 in self.snap_l1:
            if l1i >= (sl1.nbytes >> 3):
                continue
            off = sl1.get(l1i) & OFFSET_MASK
            if off == 0:
                return True
            if self._load_l2(off).get(c & (self.l2_entries - 1)) == 0:
                return True
        return False

    cdef int64_t _link_views(self, int64_t c, uint64_t entry) except -1:
        """Put ``entry`` into every view (active L1 and each snapshot's) that lacks
        cluster c; an L2 table shared by several views takes it in place, since each of
        them lacked it. Returns the number of references made.

        Every table that is missing is made first (empty, so harmless if what follows
        fails), then the entries are put without allocating: a failed allocation (a full
        disk) leaves no view pointing at the cluster."""
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t refs = 0, off, newoff, si
        cdef Table t, sl1, nt
        cdef set done = set()
        self._tables_for(l1i)
        if l1i < self.l1_size:
            off = self.l1.get(l1i) & OFFSET_MASK
            t = self._load_l2(off)
            if t.get(i2) == 0:
                t.put(i2, entry)
                refs += self.l2_refs.get(off, 1)
            done.add(off)
        for si in range(len(self.snap_l1)):
            sl1 = self.snap_l1[si]
            if l1i >= (sl1.nbytes >> 3):
                continue
            off = sl1.get(l1i) & OFFSET_MASK
            if off in done:
                continue
            t = self._load_l2(off)
            if t.get(i2) == 0:
                t.put(i2, entry)
                refs += self.l2_refs.get(off, 1)
            done.add(off)
        return refs

    cpdef bint link(self, int64_t vaddr, int64_t host) except -1:
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef int64_t refs, k
        self._bound_dirty()
        if not self.snap_l1:
            if self._l2_entry(c) != 0:
                return False
            self._set_l2(c, <uint64_t>host | COPIED)
            self.fresh.append((c, host, None))
            return True
        refs = self._link_views(c, <uint64_t>host)
        if refs == 0:
            return False
        self.fresh.append((c, host, None))
        for k in range(refs - 1):
            self._rc_add(host >> self.cluster_bits, 1)
        if refs == 1 and (self._l2_entry(c) & OFFSET_MASK) == <uint64_t>host:
            self._set_l2(c, <uint64_t>host | COPIED)
        return True

    cpdef bint link_zero(self, int64_t vaddr) except -1:
        cdef int64_t c = vaddr >> self.cluster_bits
        if self.version < 3:
            raise ValueError("qcow2 v2 has no zero clusters")
        self._bound_dirty()
        if not self.snap_l1:
            if self._l2_entry(c) != 0:
                return False
            self._set_l2(c, ZERO_FLAG)
            return True
        return self._link_views(c, ZERO_FLAG) > 0

    def write_zeroes(self, int64_t vaddr, int64_t n, object fill, bint backed):
        """Make [vaddr, vaddr+n) read zeros: zero flags for whole clusters on v3,
        zero data elsewhere (and on v2 where a backing file would show through). A guest
        write: it sets the enabled persistent bitmaps' bits for the whole range, as QEMU
        does. Raises ValueError for a range outside the virtual size."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t end = vaddr + n, v = vaddr, c, nxt
        cdef uint64_t e
        if vaddr < 0 or n < 0 or vaddr + n > self.size:
            raise ValueError("write_zeroes [%d, %d) outside the virtual size %d" % (vaddr, vaddr + n, self.size))
        if n:
            self._bound_dirty()
            self._autoclear()
            self._bitmaps_mark(vaddr, n)
        while v < end:
            c = v >> self.cluster_bits
            nxt = min((c + 1) << self.cluster_bits, end)
            if (v & (cs - 1)) == 0 and nxt - v == cs:
                e = self._l2_entry(c)
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

    # ---- ordering -----------------------------------------------------------------

    cdef _sync(self):
        try:
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
                self._free_now(c, n)

    cdef _synced(self):
        """A sync succeeded: what was written before it is durable."""
        self.fresh = []
        self.wrote_l2 = []
        self.wrote_rb = []
        self.wrote_l1 = set()
        self.wrote_snap = {}
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
        cdef Table t, sl1
        cdef int64_t si
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
        for idx, t in self.wrote_rb:
            cur = self.rb_cache.lookup(idx)
            if cur is None:
                self.rb_cache.keep(idx, t)
                cur = t
            (<Table>cur).dirty = True
        self.l1_dirty |= self.wrote_l1
        for si, idxs in self.wrote_snap.items():
            self.snap_l1_dirty[si] |= idxs
        self.rt_dirty |= self.wrote_rt
        if self.wrote_rt or self.wrote_rt_header:
            self.rt_unsynced = True
        if self.wrote_rt_header and not self.rt_moved:
            self.rt_header_redo = True
        for c, host, old in reversed(self.fresh):
            self._unlink_fresh(c, host, old)
        self._synced()
        self._trim_tail()

    cdef _unlink_fresh(self, int64_t c, int64_t host, object old):
        """Undo, in memory, a link of cluster ``c`` to ``host`` whose data may be lost:
        ``old`` is the entry it replaced (a guest's allocating write), or None for a link
        into views that lacked the cluster (a pull's copy)."""
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t i2 = c & (self.l2_entries - 1)
        cdef int64_t refs = 0, off, k
        cdef Table t, l1
        cdef set seen = set()
        if old is not None:
            if (self._l2_entry(c) & OFFSET_MASK) != <uint64_t>host:
                return
            t = self._load_l2(self.l1.get(l1i) & OFFSET_MASK)
            t.put(i2, <uint64_t>old)
            self._rc_add(host >> self.cluster_bits, -1)
            drop = self._held_by(<uint64_t>old)
            if drop is not None:
                for lst in (self.free_waiting, self.free_after_sync):
                    if drop in lst:
                        lst.remove(drop)
                        break
            return
        for l1 in [self.l1] + self.snap_l1:
            if l1i >= (l1.nbytes >> 3):
                continue
            off = l1.get(l1i) & OFFSET_MASK
            if off == 0 or off in seen:
                continue
            seen.add(off)
            t = self._load_l2(off)
            if (t.get(i2) & OFFSET_MASK) == <uint64_t>host:
                t.put(i2, 0)
                refs += self.l2_refs.get(off, 1) if self.snap_l1 else 1
        for k in range(refs):
            self._rc_add(host >> self.cluster_bits, -1)

    cdef _write_refblocks(self):
        cdef Table t
        for idx, t in self.rb_cache.items():
            if t.dirty:
                self.file.write_full(t.buf, t.nbytes, t.offset)
                t.dirty = False
                self.wrote_rb.append((idx, t))

    cpdef flush_metadata(self):
        cdef Table t, sl1
        cdef Py_ssize_t si
        cdef int64_t idx, sect
        if not self.writable:
            return
        # 1. counts and new tables, then a sync that also covers the data written so far
        self._write_refblocks()
        for t in self.l2_cache.values():
            if t.new:
                self.file.write_full(t.buf, t.nbytes, t.offset)
        if self.rt_moved:
            self.file.write_full(self.reftable.buf, self.reftable.nbytes, self.reftable.offset)
        self._sync()
        if self.rt_moved:
            self.header.write_reftable(self.file, self.rt_offset, self.rt_clusters)
            self.wrote_rt_header = True
            self.rt_header_redo = False
            # Written, the header may name the new table even if the sync below fails:
            # from here it is the live table (a later growth replaces it as such), and
            # the old one is freed only once a sync has made the switch durable.
            old_off, old_cl = self.rt_old
            self.free_after_sync.append((old_off >> self.cluster_bits, old_cl))
            self.rt_moved = False
            self.rt_dirty.clear()
            self.rt_unsynced = True
        else:
            if self.rt_header_redo:
                # a switch whose sync failed: written again, synced below
                self.header.write_reftable(self.file, self.rt_offset, self.rt_clusters)
                self.wrote_rt_header = True
                self.rt_header_redo = False
                self.rt_unsynced = True
            if self.rt_dirty:
                for sect in sorted({(i * 8) & ~511 for i in self.rt_dirty}):
                    self.file.write_full(self.reftable.buf + sect,
                                         min(512, self.reftable.nbytes - sect),
                                         self.reftable.offset + sect)
                self.wrote_rt |= self.rt_dirty
                self.rt_dirty.clear()
                self.rt_unsynced = True
        if self.rt_unsynced:
            self._sync()
            self.rt_unsynced = False
            for t in self.rb_cache.values():
                t.new = False
        # 2. the references: L2 tables and L1 entries
        for t in self.l2_cache.values():
            if t.new:
                t.new = False
                t.dirty = False
            elif t.dirty:
                self.file.write_full(t.buf, t.nbytes, t.offset)
                t.dirty = False
                self.wrote_l2.append(t)
        if self.l1_dirty:
            for sect in sorted({(i * 8) & ~511 for i in self.l1_dirty}):
                self.file.write_full(self.l1.buf + sect, min(512, self.l1.nbytes - sect),
                                     self.l1.offset + sect)
            self.wrote_l1 |= self.l1_dirty
            self.l1_dirty.clear()
            self.l1.dirty = False
        for si in range(len(self.snap_l1)):
            dirty = self.snap_l1_dirty[si]
            if dirty:
                sl1 = <Table>self.snap_l1[si]
                for sect in sorted({(i * 8) & ~511 for i in dirty}):
                    self.file.write_full(sl1.buf + sect, min(512, sl1.nbytes - sect),
                                         sl1.offset + sect)
                self.wrote_snap.setdefault(si, set()).update(dirty)
                dirty.clear()
        # 3. dropped references become free after the next sync
        self.free_after_sync.extend(self.free_waiting)
        self.free_waiting = []

    cpdef flush(self):
        """Make everything written so far durable.

        Raises OSError (EIO) for ever once a failed fdatasync may have lost guest data
        written before it (see ``_sync_failed``): that data cannot be written again, so
        no later flush may report it durable; close the image and check what the guest
        wrote since its last successful flush. Pulled data is copied again instead and
        does not make flush fail."""
        self.sync_all()
        if self.guest_lost is not None:
            raise _lost_error(self.file.path, self.guest_lost)

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
            bm.write_data(self.alloc_clusters, self.free_clusters)
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
        for t in self.rb_cache.values():
            if t.dirty:
                self._write_refblocks()
                self._sync()
                break

    # ---- backing link ---------------------------------------------------------------

    def set_backing(self, name, fmt):
        """Point the image at backing ``name`` of format ``fmt`` (or at none) crash-safely,
        after everything written so far is durable (see ``Header.set_backing``). Raises
        ValueError for a name the header cannot hold, OSError when a write or sync fails."""
        self.sync_all()
        self.header.set_backing(self.file, name, fmt, lambda: self._sync())
        self._take_names()

    # ---- introspection ------------------------------------------------------------

    def info(self):
        return {
            "version": self.version, "cluster_size": self.cluster_size,
            "refcount_bits": 1 << self.refcount_order, "snapshots": self.nb_snapshots,
            "compression_type": "zstd" if self.compression_type == 1 else "zlib",
            "incompatible": self.incompatible, "compatible": self.compatible,
            "autoclear": self.autoclear,
        }


