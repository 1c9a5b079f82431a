# cython: language_level=3
"""qcow2 cluster map: L1/L2 lookup and entry decoding, extended L2 subclusters included
(QEMU's docs/interop/qcow2.rst, "Cluster mapping" and "Extended L2 Entries").

``ClusterMap`` answers what a virtual range maps to (``block_status``) and reads it
(``read_layer``). It holds the active L1 table and the L2 table cache, and never writes:
an L2 table missing from the cache is read and may push a clean one out, never a dirty
one (blockpull._tablecache).
"""
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free

from blockpull._q2compress cimport comp_extent

from blockpull.errors import ImageFormatError


cdef class ClusterMap:
    """The cluster map of one qcow2 file ``f`` whose header ``h`` was parsed
    (blockpull._q2header.Header); ``rc`` bounds host offsets (what the file holds plus
    what was allocated since). ``l2_cache_bytes``: the L2 cache's budget in bytes (at
    least 16 tables). Raises ImageFormatError for an entry that points outside the file
    or is malformed."""

    def __init__(self, File f, Refcounts rc, h, int64_t l2_cache_bytes):
        self.file = f
        self.rc = rc
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.size = h.size
        self.version = h.version
        self.extended_l2 = h.extended_l2
        self.l2_bits = h.l2_bits
        self.l2_entries = 1LL << self.l2_bits
        self.sc_bits = self.cluster_bits - 5
        self.compression_type = h.compression_type
        self.l1_size = h.l1_size
        self.l1 = Table(h.l1_offset, self.l1_size * 8)
        if self.l1_size:
            f.read_full(self.l1.buf, self.l1_size * 8, h.l1_offset)
        self.cache = TableCache(max(16, l2_cache_bytes // self.cluster_size))
        self.last_comp_vcluster = -1
        self.ext_data = h.data_file

    def __dealloc__(self):
        free(self.comp_in)
        free(self.comp_out)

    def _err(self, msg):
        return ImageFormatError("%s: %s" % (self.file.path, msg))

    cdef Table load_l2(self, int64_t off):
        cdef Table t = <Table>self.cache.get(off)
        if t is not None:
            return t
        if off % self.cluster_size or <uint64_t>(off + self.cluster_size) > self.rc.host_end():
            raise self._err("L2 table offset 0x%x invalid" % off)
        t = Table(off, self.cluster_size)
        self.file.read_full(t.buf, self.cluster_size, off)
        self.cache.put(off, t)
        return t

    cdef uint64_t l2_entry(self, int64_t cluster) except? 0xFFFFFFFFFFFFFFFF:
        cdef int64_t l1i = cluster >> self.l2_bits
        cdef uint64_t l1e
        cdef int64_t l2off
        if l1i >= self.l1_size:
            return 0
        l1e = self.l1.get(l1i)
        l2off = l1e & OFFSET_MASK
        if l2off == 0:
            return 0
        return self.load_l2(l2off).get((cluster & (self.l2_entries - 1)) << self.extended_l2)

    cdef int64_t unalloc_l1_run(self, int64_t vaddr, int64_t l1i, int64_t limit):
        """Bytes from ``vaddr`` (whose L1 entry ``l1i`` has no L2 table) through every
        following L1 entry without one, at most ``limit``: an unallocated L1 range is
        skipped at once, so that the cost of a map follows the data."""
        cdef int64_t i = l1i + 1
        while i < self.l1_size and (self.l1.get(i) & OFFSET_MASK) == 0 and \
                ((i << (self.l2_bits + self.cluster_bits)) - vaddr) < limit:
            i += 1
        return min((i << (self.l2_bits + self.cluster_bits)) - vaddr, limit)

    cdef tuple block_status(self, int64_t vaddr, int64_t n):
        cdef int64_t cs = self.cluster_size
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef int64_t inoff = vaddr & (cs - 1)
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t l2i, run, i, limit, uoff, host0 = 0, h2 = 0
        cdef int kind, k2, ubits, per, sub
        cdef Table t
        if vaddr >= self.size:
            return (KIND_UNALLOC, n, 0)
        if self.ext_data:
            return self.status_ext(vaddr, n)
        limit = min(n, self.size - vaddr)
        if l1i >= self.l1_size or (self.l1.get(l1i) & OFFSET_MASK) == 0:
            return (KIND_UNALLOC, self.unalloc_l1_run(vaddr, l1i, limit), 0)
        t = self.load_l2(self.l1.get(l1i) & OFFSET_MASK)
        l2i = c & (self.l2_entries - 1)
        if self.extended_l2:
            ubits = self.sc_bits
            per = 32
            sub = (vaddr >> ubits) & 31
        else:
            ubits = self.cluster_bits
            per = 1
            sub = 0
        kind = self.unit(t, c, l2i, sub, &host0)
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
            k2 = self.unit(t, (vaddr + run) >> self.cluster_bits, l2i, sub, &h2)
            if k2 != kind or (h2 == 0) != (host0 == 0):
                break
            if host0 and h2 != host0 + uoff + run:
                break
            run += 1LL << ubits
        return (kind, min(run, limit), (host0 + uoff) if host0 else 0)

    cdef int unit(self, Table t, int64_t c, int64_t l2i, int sub, int64_t* host) except -1:
        """Kind of cluster ``c`` (entry ``l2i`` of L2 table ``t``) or, with extended L2
        entries, of its subcluster ``sub``; ``host`` gets the host offset of that unit
        wherever the image has one (data, preallocated zeros, allocated subclusters that
        are not in use) and 0 elsewhere, as ``qemu-img map`` reports it."""
        cdef uint64_t e, bm, off
        cdef int kind
        if not self.extended_l2:
            e = t.get(l2i)
            kind = self.kind(e)
            off = e & OFFSET_MASK
            if kind == KIND_COMPRESSED or kind == KIND_UNALLOC:
                host[0] = 0
                return kind
            if off & (self.cluster_size - 1):
                raise self._err("L2 entry for cluster %d points at unaligned offset 0x%x" % (c, off))
            if off and off + self.cluster_size > self.rc.host_end():
                raise self._err("L2 entry for cluster %d points past the end of "
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
            raise self._err("L2 entry for cluster %d points at unaligned offset 0x%x" % (c, off))
        if off and off + self.cluster_size > self.rc.host_end():
            raise self._err("L2 entry for cluster %d points past the end of "
                           "the file (0x%x)" % (c, off))
        if (bm >> 32) & bm & 0xFFFFFFFFULL:
            raise self._err("extended L2 entry for cluster %d marks subclusters "
                           "both allocated and zero (bitmap 0x%016x)" % (c, bm))
        if off == 0 and bm & 0xFFFFFFFFULL:
            raise self._err("extended L2 entry for cluster %d has allocated "
                           "subclusters but no host offset" % c)
        if off:
            host[0] = off + (<uint64_t>sub << self.sc_bits)
        if bm & (1ULL << (32 + sub)):
            return KIND_ZERO
        if bm & (1ULL << sub):
            return KIND_DATA
        return KIND_UNALLOC

    cdef int read_layer(self, int64_t vaddr, unsigned char* out, int64_t n, int kind,
                        int64_t host) except -1:
        cdef int64_t cs = self.cluster_size
        cdef int64_t inoff, c
        cdef bytes plain
        if kind == KIND_DATA:
            if self.ext_data:
                if self.data is None:
                    raise self._err("its external data file is not open")
                self.data.read_full(out, n, host)
            else:
                self.file.read_full(out, n, host)
        elif kind == KIND_ZERO:
            memset(out, 0, n)
        elif kind == KIND_COMPRESSED:
            c = vaddr >> self.cluster_bits
            inoff = vaddr & (cs - 1)
            if inoff + n > cs:
                raise ValueError("compressed read crosses a cluster")
            if n == cs:
                self.decompress(c, out)          # straight into the caller's buffer
                return 0
            if c != self.last_comp_vcluster:
                if self.comp_out == NULL:
                    self.comp_out = <unsigned char*>malloc(cs)
                    if self.comp_out == NULL:
                        raise MemoryError()
                self.last_comp_vcluster = -1
                self.decompress(c, self.comp_out)
                self.last_comp_vcluster = c      # partial reads of one cluster decode once
            memcpy(out, self.comp_out + inoff, n)
        else:
            raise ValueError("read_layer of an unallocated range")
        return 0

    cdef int decompress(self, int64_t c, unsigned char* out) except -1:
        """Decode compressed virtual cluster ``c`` into the ``cluster_size`` bytes at
        ``out``. Its compressed bytes span at most 2 ** (cluster_bits - 8) sectors of 512
        bytes (the descriptor's sector count), which is two clusters."""
        cdef uint64_t coff, clen
        comp_extent(self.l2_entry(c), self.cluster_bits, &coff, &clen)
        if coff >= <uint64_t>self.rc.file_size:
            raise self._err("compressed cluster %d lies past the end of the file" % c)
        clen = min(clen, self.rc.file_size - coff)
        if self.decomp is None:
            self.decomp = Decompressor(self.cluster_size, self.compression_type, self.file.path)
        if self.comp_in == NULL:
            self.comp_in = <unsigned char*>malloc(2 * self.cluster_size)
            if self.comp_in == NULL:
                raise MemoryError()
        self.file.read_full(self.comp_in, clen, coff)
        self.decomp.decode(self.comp_in, clen, out, c)
        return 0

    # ---- external data file (QEMU's docs/interop/qcow2.rst, "Header", incompatible bit 2)

    cdef tuple status_ext(self, int64_t vaddr, int64_t n):
        """``block_status`` of an image whose data clusters live in an external data file
        at their guest offset: the host offset of data is ``vaddr`` itself (0 included);
        runs join units of one kind. Only L2 tables are read."""
        cdef int64_t limit = min(n, self.size - vaddr)
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t l2i, run, i
        cdef int kind, k2, ubits, per, sub
        cdef bint h0 = False, h2 = False
        cdef Table t
        if l1i >= self.l1_size or (self.l1.get(l1i) & OFFSET_MASK) == 0:
            return (KIND_UNALLOC, self.unalloc_l1_run(vaddr, l1i, limit), 0)
        t = self.load_l2(self.l1.get(l1i) & OFFSET_MASK)
        l2i = c & (self.l2_entries - 1)
        ubits, per, sub = self.cluster_bits, 1, 0
        if self.extended_l2:
            ubits, per, sub = self.sc_bits, 32, (vaddr >> self.sc_bits) & 31
        kind = self.unit_ext(t, c, l2i, sub, &h0)
        run = (1LL << ubits) - (vaddr & ((1LL << ubits) - 1))
        while run < limit:
            sub += 1
            if sub == per:
                sub = 0
                l2i += 1
                if l2i == self.l2_entries:
                    break
            k2 = self.unit_ext(t, (vaddr + run) >> self.cluster_bits, l2i, sub, &h2)
            if k2 != kind or h2 != h0:
                break
            run += 1LL << ubits
        return (kind, min(run, limit), vaddr if h0 else 0)

    cdef int unit_ext(self, Table t, int64_t c, int64_t l2i, int sub, bint* hosted) except -1:
        """Kind of cluster ``c`` (entry ``l2i`` of ``t``; subcluster ``sub`` with extended
        L2 entries) in an image with an external data file; ``hosted`` says whether the
        entry names a host offset (offset 0 counts when COPIED is set, unless it is a zero
        cluster). That offset must
        be the cluster's guest offset, and no cluster is compressed."""
        cdef uint64_t e = t.get(l2i << self.extended_l2)
        cdef uint64_t bm = t.get(2 * l2i + 1) if self.extended_l2 else 0
        cdef uint64_t off = e & OFFSET_MASK
        cdef bint zero = not self.extended_l2 and self.version == 3 and (e & ZERO_FLAG) != 0
        if e & COMPRESSED_FLAG:
            raise self._err("compressed cluster %d in an image with an external data file "
                            "(not allowed by the qcow2 format)" % c)
        # offset 0 is cluster 0's data when COPIED is set (a zero cluster: no offset),
        # as QEMU tells them apart
        hosted[0] = off != 0 or ((e & COPIED) != 0 and not zero)
        if hosted[0] and off != <uint64_t>c << self.cluster_bits:
            raise self._err("L2 entry for cluster %d points at 0x%x in the external data "
                            "file, not at its guest offset 0x%x" % (c, off, c << self.cluster_bits))
        if not self.extended_l2:
            if zero:
                return KIND_ZERO
            return KIND_DATA if hosted[0] else KIND_UNALLOC
        if (bm >> 32) & bm & 0xFFFFFFFFULL:
            raise self._err("extended L2 entry for cluster %d marks subclusters "
                            "both allocated and zero (bitmap 0x%016x)" % (c, bm))
        if not hosted[0] and bm & 0xFFFFFFFFULL:
            raise self._err("extended L2 entry for cluster %d has allocated "
                            "subclusters but no host offset" % c)
        if bm & (1ULL << (32 + sub)):
            return KIND_ZERO
        if bm & (1ULL << sub):
            return KIND_DATA
        return KIND_UNALLOC
