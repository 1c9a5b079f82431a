# cython: language_level=3
"""QED: the driver (Qed): two-level translation, append allocation, write ordering.

The layout (header, tables, entries, probing, creating) is in _qed_format, the check in
_qed_check. There are no refcounts: new clusters are appended at the end of the file. The
L2 cache is bounded and a lookup never writes. Metadata is written back in the order of
docs/crash-model.md, "How the drivers keep it": L2 tables claimed before data, data before
reference, brand-new L2 tables written whole and the file extended over every linked
cluster, one fdatasync, then the changed L2 and L1 entries (``flush_metadata``); a failed
fdatasync makes everything since the last good one count as not written (``_sync_failed``).

The need-check bit is never set: why is in docs/crash-model.md, "How the drivers keep it".
An image with it set is refused read-write here; ``blockpull.open`` repairs it first, as
QEMU does (blockpull.repair).

Every value read from the file is checked before use: header fields at open
(``read_header``), each L1 and L2 entry when it is used (cluster aligned, after the header,
inside the file or our own allocation). Errors are ``ImageFormatError`` naming the field.
"""
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy, memset

from blockpull._fileio cimport File
from blockpull._driver cimport Driver, KIND_UNALLOC, KIND_DATA, KIND_ZERO
from blockpull._qed_format cimport L2_CACHE_BYTES, ZERO_ENTRY, QedHeader, Table, read_header
from blockpull._tablecache cimport TableCache
import errno as _errno

from blockpull.errors import lost_writes_error
from blockpull._qed_format import (  # noqa: F401 (the module's public names)
    DEFAULT_TABLE_SIZE, F_BACKING_FILE, F_BACKING_RAW, F_NEED_CHECK, HEADER_BYTES,
    KNOWN_FEATURES, MAGIC, MAX_CLUSTER_SIZE, MAX_TABLE_SIZE, MIN_CLUSTER_SIZE,
    backing_name_slot, create, format_error, link_sector, max_image_size, probe)


cdef class Qed(Driver):
    """A QED image file."""
    cdef readonly int table_size
    cdef readonly int64_t header_size
    cdef readonly uint64_t features
    cdef readonly uint64_t compat_features
    cdef readonly uint64_t autoclear_features
    cdef readonly int64_t l1_offset
    cdef readonly int64_t backing_offset
    cdef readonly int64_t backing_size
    cdef readonly int64_t table_bytes
    cdef readonly int64_t next_free       # host byte offset where the next append goes
    cdef readonly int64_t syncs
    cdef int l2_bits
    cdef int64_t l2_entries
    cdef int64_t header_end               # header_size * cluster_size
    cdef int64_t file_end0                # file size at open, rounded up to a cluster
    cdef int64_t linked_end               # the file must reach this before references sync
    cdef Table l1
    cdef TableCache l2_cache              # L2 tables by offset (never writes)
    cdef list free_runs                   # [(host, clusters)] given back, never linked
    cdef bint autoclear_done
    cdef public object lock
    # since the last good fdatasync (see _sync_failed):
    cdef list fresh                       # (cluster, host, old entry or None) with new data
    cdef list wrote                       # (table, lo, hi) of table writes
    cdef bint guest_dirty                 # guest data written
    cdef bint recovering                  # inside _sync_failed: no cache eviction
    cdef readonly int64_t sync_failures
    cdef object guest_lost                # the failed sync's OSError, once guest data was lost

    def __init__(self, File f, bint writable, *, int64_t l2_cache_bytes=0):
        self.file = f
        self.writable = writable
        self.format = "qed"
        self.has_zero_flag = True
        self.free_runs = []
        self._synced()
        self._parse()
        if l2_cache_bytes > 0:      # a smaller cache (the default is L2_CACHE_BYTES)
            self.l2_cache = TableCache(max(2, l2_cache_bytes // self.table_bytes))

    # ---- header -----------------------------------------------------------------

    def _parse(self):
        cdef QedHeader h = read_header(self.file)
        path = self.file.path
        self.cluster_size, self.cluster_bits = h.cluster_size, h.cluster_bits
        self.table_size, self.table_bytes = h.table_size, h.table_bytes
        self.l2_entries, self.l2_bits = h.l2_entries, h.l2_bits
        self.header_size, self.header_end = h.header_size, h.header_end
        self.features, self.compat_features = h.features, h.compat_features
        self.autoclear_features, self.l1_offset, self.size = (
            h.autoclear_features, h.l1_offset, h.size)
        self.backing_offset, self.backing_size = h.backing_offset, h.backing_size
        self.backing_name = h.backing_name
        # QED records no format but "raw": any other must be named by the caller
        self.backing_format = None
        if h.backing_name is not None and h.features & F_BACKING_RAW:
            self.backing_format = "raw"
        if self.writable and h.features & F_NEED_CHECK:
            raise format_error(path, "the need-check feature bit is set (QEMU did not close "
                               "it cleanly); repair it with 'qemu-img check -r all %s' or "
                               "open it read-only" % path)
        self.l1 = Table(h.l1_offset, self.table_bytes)
        self.l1.load(self.file)
        self.l2_cache = TableCache(max(2, L2_CACHE_BYTES // self.table_bytes))
        cs = self.cluster_size
        self.file_end0 = (h.file_size + cs - 1) & ~(cs - 1)
        self.next_free = self.file_end0
        self.linked_end = 0
        self.autoclear_done = h.autoclear_features == 0
        if self.file.is_device and self.writable:
            # a device is "file" to its end: what the image uses ends at its last
            # referenced cluster, and appends go after it, up to the device's end
            self.file_end0 = h.file_size & ~(cs - 1)
            self.next_free = self._referenced_end()

    cdef int64_t _referenced_end(self) except -1:
        """End of the last cluster that the header, the L1 table, an L2 table or a data
        entry uses (every table is validated as it is read)."""
        cdef int64_t end = max(self.header_end, self.l1_offset + self.table_bytes)
        cdef int64_t i, j
        cdef uint64_t off, e
        cdef Table t
        for i in range(self.l2_entries):
            off = self.l1.get(i)
            if off == 0:
                continue
            t = self._load_l2(i)
            end = max(end, <int64_t>off + self.table_bytes)
            for j in range(self.l2_entries):
                e = t.get(j)
                if e > ZERO_ENTRY:
                    self._check_data(e, (i << self.l2_bits) + j)
                    end = max(end, <int64_t>e + self.cluster_size)
        return end

    # ---- tables -----------------------------------------------------------------

    cdef inline int64_t _limit(self) noexcept:
        """End of the space an entry may point into: the file, or what we appended."""
        return self.file_end0 if self.file_end0 > self.next_free else self.next_free

    cdef Table _load_l2(self, int64_t l1i):
        cdef uint64_t off = self.l1.get(l1i)
        cdef Table t = <Table>self.l2_cache.get(off)
        if t is not None:
            return t
        if (off & <uint64_t>(self.cluster_size - 1)) or off < <uint64_t>self.header_end or \
                off > <uint64_t>(self._limit() - self.table_bytes):
            raise format_error(self.file.path, "L1 entry %d points at 0x%x: not a cluster aligned "
                           "table inside the file" % (l1i, off))
        t = Table(<int64_t>off, self.table_bytes)
        self.file.read_full(t.buf, self.table_bytes, <int64_t>off)
        self._cache_put(t)
        return t

    cdef _cache_put(self, Table t):
        """Keep L2 table ``t`` in the one ``TableCache``: only clean tables make room, so
        a read or a map never writes or syncs; the write path bounds the dirty ones."""
        self.l2_cache.put(t.offset, t)

    cdef int _bound_dirty(self) except -1:
        """Write path, before a change: dirty tables holding the cache over its budget
        are written at a flush point, then dropped."""
        if self.l2_cache.excess() and not self.recovering:
            self.flush_metadata()
            self.l2_cache.drop_clean()
        return 0

    cdef inline int _check_data(self, uint64_t e, int64_t c) except -1:
        """A data entry must name a whole cluster after the header and inside the file."""
        if (e & <uint64_t>(self.cluster_size - 1)) or e < <uint64_t>self.header_end or \
                e > <uint64_t>(self._limit() - self.cluster_size) or \
                (e >= <uint64_t>self.l1_offset and e < <uint64_t>(self.l1_offset + self.table_bytes)):
            raise format_error(self.file.path, "L2 entry for cluster %d points at 0x%x: not a "
                           "cluster aligned offset inside the file, clear of the header "
                           "and the L1 table" % (c, e))
        return 0

    cdef uint64_t _l2_entry(self, int64_t c) except? 0xFFFFFFFFFFFFFFFF:
        """The raw L2 entry of virtual cluster c (0 where no L2 table covers it)."""
        cdef int64_t l1i = c >> self.l2_bits
        if l1i >= self.l2_entries or self.l1.get(l1i) == 0:
            return 0
        return self._load_l2(l1i).get(c & (self.l2_entries - 1))

    cpdef tuple block_status(self, int64_t vaddr, int64_t n):
        """(kind, length, host) of the longest run from ``vaddr`` (at most ``n`` bytes)
        that this file answers in one way: unallocated L1 ranges are skipped at once and
        data runs merge while they stay contiguous on the host."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t c = vaddr >> self.cluster_bits
        cdef int64_t inoff = vaddr & (cs - 1)
        cdef int64_t l1i = c >> self.l2_bits
        cdef int64_t l2i, run, i, limit
        cdef int64_t span = self.l2_bits + self.cluster_bits
        cdef uint64_t e, e2
        cdef int kind
        cdef Table t
        if vaddr >= self.size or n <= 0:
            return (KIND_UNALLOC, n, 0)
        limit = min(n, self.size - vaddr)
        if self.l1.get(l1i) == 0:
            i = l1i + 1
            while i < self.l2_entries and self.l1.get(i) == 0 and (i << span) - vaddr < limit:
                i += 1
            return (KIND_UNALLOC, min((i << span) - vaddr, limit), 0)
        t = self._load_l2(l1i)
        l2i = c & (self.l2_entries - 1)
        e = t.get(l2i)
        if e == 0:
            kind = KIND_UNALLOC
        elif e == ZERO_ENTRY:
            kind = KIND_ZERO
        else:
            kind = KIND_DATA
            self._check_data(e, c)
        run = cs - inoff
        i = l2i + 1
        while run < limit and i < self.l2_entries:
            e2 = t.get(i)
            if kind == KIND_DATA:
                if e2 != e + <uint64_t>((i - l2i) * cs):
                    break
                self._check_data(e2, c + i - l2i)
            elif e2 != e:
                break
            run += cs
            i += 1
        return (kind, min(run, limit), <int64_t>e + inoff if kind == KIND_DATA else 0)

    # ---- allocation ---------------------------------------------------------------

    cdef int64_t _alloc(self, int64_t n) except -1:
        """``n`` contiguous clusters: from space given back, else appended."""
        cdef int64_t host, m, i
        for i in range(len(self.free_runs)):
            host, m = self.free_runs[i]
            if m >= n:
                if m > n:
                    self.free_runs[i] = (host + n * self.cluster_size, m - n)
                else:
                    del self.free_runs[i]
                return host
        host = self.next_free
        if self.file.is_device and host + n * self.cluster_size > self.file_end0:
            # a device cannot grow
            raise OSError(_errno.ENOSPC, "no space left on block device: %d clusters at "
                          "0x%x pass its end (%d bytes)" % (n, host, self.file_end0),
                          self.file.path)
        self.next_free += n * self.cluster_size
        return host

    cpdef int64_t alloc_clusters(self, int64_t n) except -1:
        """Reserve ``n`` contiguous host clusters for data; returns the host offset.
        Nothing points at them until ``link``; ``free_clusters`` gives them back."""
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        if n <= 0:
            raise ValueError("alloc_clusters needs n > 0")
        self._autoclear()
        return self._alloc(n)

    cpdef free_clusters(self, int64_t host, int64_t n):
        """Give back clusters from alloc_clusters that were never linked: at the end of
        the file they are cut off, elsewhere kept for the next allocation (left
        unreferenced if none comes, which ``qemu-img check`` counts as a harmless leak)."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t h, m
        if n <= 0:
            return
        if host + n * cs != self.next_free:
            self.free_runs.append((host, n))
            return
        self.next_free = host
        merged = True
        while merged:
            merged = False
            for i, (h, m) in enumerate(self.free_runs):
                if h + m * cs == self.next_free:
                    self.next_free = h
                    del self.free_runs[i]
                    merged = True
                    break
        if self.next_free >= self.linked_end and self.file.size() > self.next_free:
            self.file.truncate(self.next_free)

    def ensure_tables(self, int64_t vaddr, int64_t n):
        """Make the L2 tables (empty, their space claimed) that linking clusters in
        [vaddr, vaddr+n) will need: tables before data, so that a full disk fails here
        before any data depends on them."""
        cdef int64_t span = self.l2_bits + self.cluster_bits
        cdef int64_t l1i
        if n <= 0:
            return
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        self._autoclear()
        self._bound_dirty()
        for l1i in range(vaddr >> span, ((vaddr + n - 1) >> span) + 1):
            if l1i < self.l2_entries and self.l1.get(l1i) == 0:
                self._l2_for_write(l1i)

    cdef Table _l2_for_write(self, int64_t l1i):
        """The L2 table for L1 entry ``l1i``, allocated (appended, written at the next
        flush_metadata before the L1 entry) when there is none."""
        cdef int64_t off
        cdef Table nt
        if l1i >= self.l2_entries:
            raise ValueError("write past the L1 table")
        if self.l1.get(l1i) != 0:
            return self._load_l2(l1i)
        off = self._alloc(self.table_size)
        # Claim the table's space now: written back only at the next flush_metadata, it
        # must not be the write that a full disk fails, after data was linked to it.
        try:
            self.file.write_full(bytes(self.table_bytes), self.table_bytes, off)
        except Exception:
            self.free_clusters(off, self.table_size)
            raise
        nt = Table(off, self.table_bytes)
        nt.new = True
        self._cache_put(nt)
        self.l1.put(l1i, <uint64_t>off)
        self._note_linked(off + self.table_bytes)
        return nt

    cdef inline void _note_linked(self, int64_t end) noexcept:
        if end > self.linked_end:
            self.linked_end = end

    cdef _set_l2(self, int64_t c, uint64_t e):
        cdef Table t = self._l2_for_write(c >> self.l2_bits)
        t.put(c & (self.l2_entries - 1), e)

    cdef int _check_ours(self, int64_t host) except -1:
        if host & (self.cluster_size - 1) or host < self.header_end or \
                host + self.cluster_size > self.next_free:
            raise ValueError("%s: host offset 0x%x was not allocated by alloc_clusters"
                             % (self.file.path, host))
        return 0

    cpdef bint link(self, int64_t vaddr, int64_t host) except -1:
        """Point the cluster at ``vaddr`` at ``host`` (from alloc_clusters, data already
        written) if it is still unallocated here; False if it is not."""
        cdef int64_t c = vaddr >> self.cluster_bits
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        if vaddr < 0 or vaddr >= self.size:
            raise ValueError("link at %d outside the virtual size %d" % (vaddr, self.size))
        self._check_ours(host)
        self._bound_dirty()
        if self._l2_entry(c) != 0:
            return False
        self._set_l2(c, <uint64_t>host)
        self._note_linked(host + self.cluster_size)
        self.fresh.append((c, host, None))
        return True

    cpdef bint link_zero(self, int64_t vaddr) except -1:
        """Mark the cluster at ``vaddr`` as reading zeros if it is still unallocated."""
        cdef int64_t c = vaddr >> self.cluster_bits
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        if vaddr < 0 or vaddr >= self.size:
            raise ValueError("link_zero at %d outside the virtual size %d" % (vaddr, self.size))
        self._bound_dirty()
        if self._l2_entry(c) != 0:
            return False
        self._autoclear()
        self._set_l2(c, ZERO_ENTRY)
        return True

    cdef _autoclear(self):
        """Clear autoclear feature bits (none are defined, so we maintain none) before the
        first change, as the format asks of a writer that does not know them."""
        cdef unsigned char b[8]
        if self.autoclear_done:
            return
        self.autoclear_done = True
        if self.autoclear_features:
            self.autoclear_features = 0
            memset(b, 0, 8)
            self.file.write_full(b, 8, 32)
            self._sync()

    # ---- writes -------------------------------------------------------------------

    cdef _old_content(self, int64_t c, uint64_t e, unsigned char[::1] out, object fill):
        """What unallocated or zero cluster ``c`` (entry ``e``) reads now, into ``out``."""
        cdef int64_t vc = c << self.cluster_bits
        cdef int64_t want = min(self.cluster_size, self.size - vc)
        memset(&out[0], 0, out.shape[0])
        if e == 0 and fill is not None and want > 0:
            fill(vc, out[:want])

    cdef bytearray _partial(self, int64_t c, uint64_t e, object fill, const unsigned char[::1] src,
                            int64_t at, int64_t n):
        """One cluster: its old content with ``src[:n]`` laid over it at ``at``."""
        cdef bytearray buf = bytearray(self.cluster_size)
        cdef unsigned char[::1] bv = buf
        self._old_content(c, e, bv, fill)
        memcpy(&bv[at], &src[0], n)
        return buf

    cdef list _new_views(self, object mv, const unsigned char[::1] src, int64_t pos,
                         int64_t run_n, int64_t c, int64_t k, int64_t coff, int64_t take,
                         uint64_t e, object fill):
        """The buffers ``k`` new clusters from virtual cluster ``c`` (entry ``e``) are
        written from: ``src[pos:pos + run_n]`` (``mv`` the same bytes), starting ``coff``
        into the first cluster, ``take`` bytes of it; partial clusters are completed by
        ``_partial``."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t mid, tail
        if k == 1:
            if coff or take < cs:
                return [self._partial(c, e, fill, src[pos:], coff, take)]
            return [mv[pos:pos + cs]]
        views = [self._partial(c, e, fill, src[pos:], coff, take) if coff
                 else mv[pos:pos + cs]]
        mid = (k - 2) * cs
        if mid:
            views.append(mv[pos + take:pos + take + mid])
        tail = run_n - take - mid
        if tail < cs:
            views.append(self._partial(c + k - 1, self._l2_entry(c + k - 1), fill,
                                       src[pos + take + mid:], 0, tail))
        else:
            views.append(mv[pos + take + mid:pos + run_n])
        return views

    cpdef write(self, int64_t vaddr, object data, object fill):
        """Write ``data`` at ``vaddr``: in place over this file's data clusters (one write
        per host-contiguous run), elsewhere into appended clusters, the partial first and
        last ones completed from ``fill(vaddr, buffer)`` (the layers below) or zeros."""
        cdef const unsigned char[::1] src
        cdef int64_t cs = self.cluster_size
        cdef int64_t n, pos, v, c, coff, take, run_n, k, i, host
        cdef uint64_t e, e2
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        mv = memoryview(data).cast("B")
        src = mv
        n = src.shape[0]
        if vaddr < 0 or vaddr + n > self.size:
            raise ValueError("write [%d, %d) outside the virtual size %d" % (vaddr, vaddr + n, self.size))
        if n == 0:
            return
        self._autoclear()
        self._bound_dirty()
        pos = 0
        while pos < n:
            v = vaddr + pos
            c = v >> self.cluster_bits
            coff = v & (cs - 1)
            take = min(cs - coff, n - pos)
            e = self._l2_entry(c)
            if e > ZERO_ENTRY:
                self._check_data(e, c)
                run_n = take
                k = 1
                while pos + run_n < n:
                    e2 = self._l2_entry(c + k)
                    if e2 != e + <uint64_t>(k * cs):
                        break
                    self._check_data(e2, c + k)
                    run_n += min(cs, n - pos - run_n)
                    k += 1
                self.guest_dirty = True
                self.file.write_full(&src[pos], run_n, <int64_t>e + coff)
                pos += run_n
                continue
            # a run of clusters with no data here: append them, written in one go
            k = 1
            while pos + (k * cs - coff) < n and self._l2_entry(c + k) <= ZERO_ENTRY:
                k += 1
            run_n = min(k * cs - coff, n - pos)
            views = self._new_views(mv, src, pos, run_n, c, k, coff, take, e, fill)
            self.ensure_tables(v - coff, k * cs)     # tables before data
            host = self._alloc(k)
            i = 0
            try:
                self.guest_dirty = True
                self.file.writev_full(views, host)
                while i < k:
                    e2 = self._l2_entry(c + i)
                    self._set_l2(c + i, <uint64_t>(host + i * cs))
                    self._note_linked(host + (i + 1) * cs)
                    self.fresh.append((c + i, host + i * cs, e2))
                    i += 1
            except Exception:
                # nothing points at the clusters not linked yet: give them back
                self.free_clusters(host + i * cs, k - i)
                raise
            pos += run_n

    def write_zeroes(self, int64_t vaddr, int64_t n, object fill, bint backed):
        """Make [vaddr, vaddr+n) read zeros. Ranges that already do (zero entries, and
        unallocated ones when nothing is ``backed`` below) are left alone; data clusters
        get zeros written in place (nothing is unlinked, so nothing leaks); whole
        unallocated clusters over a backing file get zero entries; partial ones are
        written through copy-on-write."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t end = vaddr + n, v = vaddr, c, nxt, l1i
        cdef int span = self.l2_bits + self.cluster_bits
        cdef uint64_t e
        cdef bytes zeros = None
        if not self.writable:
            raise PermissionError("image %s is open read-only" % self.file.path)
        if vaddr < 0 or n < 0 or end > self.size:
            raise ValueError("write_zeroes [%d, %d) outside the virtual size %d" % (vaddr, end, self.size))
        self._autoclear()
        self._bound_dirty()
        while v < end:
            c = v >> self.cluster_bits
            nxt = min((c + 1) << self.cluster_bits, end)
            l1i = c >> self.l2_bits
            if not backed and self.l1.get(l1i) == 0:
                v = min((l1i + 1) << span, end)
                continue
            e = self._l2_entry(c)
            if e == ZERO_ENTRY or (e == 0 and not backed):
                v = nxt
                continue
            if e > ZERO_ENTRY:
                self._check_data(e, c)
                if zeros is None:
                    zeros = bytes(cs)
                self.guest_dirty = True
                self.file.write_full(zeros, nxt - v, <int64_t>e + (v & (cs - 1)))
            elif (v & (cs - 1)) == 0 and (nxt - v == cs or nxt == self.size):
                self._set_l2(c, ZERO_ENTRY)
            else:
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

    cdef _synced(self):
        """A sync succeeded: what was written before it is durable."""
        self.fresh = []
        self.wrote = []
        self.guest_dirty = False

    cdef _write_table(self, Table t):
        """Write a table's changed entries, noting them until the next good sync."""
        if t.dirty():
            self.wrote.append((t, t.dlo, t.dhi))
            t.write_dirty(self.file)

    cdef _sync_failed(self, exc):
        """fdatasync failed: everything written since the last good sync counts as not
        written (Linux may have dropped those pages, and a later fdatasync can succeed
        without writing them). Table entries written since then are written again by the
        next flush_metadata; clusters linked since then to new data (pulled copies, a
        guest's appended writes) are unlinked in memory and given back, so that no entry
        ever points at data that may not be there (a pull copies them again); guest data
        written since then cannot be written again, so every later ``flush`` raises."""
        cdef Table t
        cdef int64_t c, host, l1i
        self.sync_failures += 1
        if self.guest_dirty and self.guest_lost is None:
            self.guest_lost = exc
        self.recovering = True
        try:
            for t, lo, hi in self.wrote:
                if t is not self.l1:
                    cur = self.l2_cache.lookup(t.offset)
                    if cur is None:
                        self.l2_cache.keep(t.offset, t)
                        cur = t
                    t = <Table>cur
                t.touch(lo, hi)
            for c, host, old in reversed(self.fresh):
                l1i = c >> self.l2_bits
                if self.l1.get(l1i) == 0:
                    continue
                t = self._load_l2(l1i)
                if t.get(c & (self.l2_entries - 1)) != <uint64_t>host:
                    continue
                t.put(c & (self.l2_entries - 1), 0 if old is None else <uint64_t>old)
                self.free_runs.append((host, 1))
        finally:
            self.recovering = False
        self._synced()

    cpdef flush_metadata(self):
        """New L2 tables written whole and the file grown over every linked cluster, one
        fdatasync (covering the data written so far too), then the L2 and L1 entries that
        point at them."""
        cdef Table t
        if not self.writable:
            return
        for t in self.l2_cache.values():
            if t.new:
                self.file.write_full(t.buf, t.nbytes, t.offset)
        if self.linked_end > self.file.size():
            # a data cluster written short must still lie inside the file
            self.file.truncate(self.linked_end)
        self._sync()
        for t in self.l2_cache.values():
            if t.new:
                t.new = False
                t.clean()
            elif t.dirty():
                self._write_table(t)
        self._write_table(self.l1)

    cpdef flush(self):
        """Make everything written so far durable.

        Raises OSError (EIO) for ever once a failed fdatasync may have lost guest data
        written before it (see ``_sync_failed``): that data cannot be written again, so
        no later flush may report it durable; close the image and check what the guest
        wrote since its last successful flush."""
        self.sync_all()
        if self.guest_lost is not None:
            raise lost_writes_error(self.file.path, self.guest_lost)

    def sync_all(self):
        """``flush`` without the report of guest writes a failed sync lost: what a pull
        needs before it changes the backing link."""
        if not self.writable:
            return
        self.flush_metadata()
        self._sync()

    # ---- backing link ---------------------------------------------------------------

    def set_backing(self, name, fmt):
        """Point the image at backing ``name`` (None: no backing) crash-safely: the new
        name is written where the old one is not and made durable, then one write of the
        first sector switches offset, size and feature bits. QED records only the "raw"
        format (bit 0x04); any other ``fmt`` leaves the bit clear, and the next open finds
        a qcow2 or QED backing by its magic."""
        cdef int64_t pos, ln
        self.sync_all()
        features = self.features
        if name is None:
            features &= ~(F_BACKING_FILE | F_BACKING_RAW)
            self._switch(features, 0, 0)
            self.backing_name = None
            self.backing_format = None
            return
        bname = name.encode("utf-8", "surrogateescape")
        ln = len(bname)
        pos = backing_name_slot(self.file.path, bname, self.features, self.backing_offset,
                                self.backing_size, self.header_end)
        self.file.write_full(bname, ln, pos)
        self._sync()
        features |= F_BACKING_FILE
        if fmt == "raw":
            features |= F_BACKING_RAW
        else:
            features &= ~F_BACKING_RAW
        self._switch(features, pos, ln)
        self.backing_name = name
        self.backing_format = fmt

    def _switch(self, uint64_t features, int64_t offset, int64_t size):
        """One write of the first sector: features and backing name offset/size."""
        self.file.pwrite(link_sector(self.file.pread(0, 512), features, offset, size), 0)
        self._sync()
        self.features = features
        self.backing_offset = offset
        self.backing_size = size

    # ---- introspection ------------------------------------------------------------

    def info(self):
        """Format-specific facts, for ``blockpull info``."""
        return {
            "cluster_size": self.cluster_size, "table_size": self.table_size,
            "header_size": self.header_size, "features": self.features,
            "compat_features": self.compat_features,
            "autoclear_features": self.autoclear_features,
            "need_check": bool(self.features & F_NEED_CHECK),
        }
