# cython: language_level=3
"""qcow2 refcounts: the refcount table, its blocks, and cluster allocation.

``Refcounts`` reads and changes counts in memory and finds room for new clusters. It
writes only what its owner asks for, when it asks (``claim`` zeroes reserved metadata
clusters at once; ``write_blocks``/``write_table`` at the owner's flush point, in the
owner's declared order) and never syncs: a new refcount block or a grown table is made
in memory, marked new, and left to the owner's flush (see ``Qcow2.flush_metadata``).
Format facts: QEMU's docs/interop/qcow2.rst, "Host cluster management".
"""
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

import errno

from blockpull.errors import ImageFormatError
from blockpull._q2header import MAX_REFTABLE_BYTES

#: refcount blocks kept in memory, in bytes (dirty ones may exceed it until a flush)
RB_CACHE_BYTES = 16 * 1024 * 1024


cdef class Refcounts:
    """The refcounts of one qcow2 file ``f``: the refcount table of ``rt_clusters``
    clusters at ``rt_offset`` (bytes), counts of 2**``refcount_order`` bits. The file is
    ``file_size`` bytes long. Raises ImageFormatError for a block that lies outside the
    file, a count that would overflow or drop below zero."""

    def __init__(self, File f, int cluster_bits, int refcount_order, int64_t rt_offset,
                 int64_t rt_clusters, int64_t file_size):
        self.file = f
        self.cluster_bits = cluster_bits
        self.cluster_size = 1LL << cluster_bits
        self.refcount_order = refcount_order
        self.rb_bits = cluster_bits + 3 - refcount_order
        self.rb_entries = 1LL << self.rb_bits
        self.rc_max = (1ULL << (1 << refcount_order)) - 1 if refcount_order < 6 else <uint64_t>-1
        self.table = Table(rt_offset, rt_clusters * self.cluster_size)
        f.read_full(self.table.buf, self.table.nbytes, rt_offset)
        self.cache = TableCache(max(16, RB_CACHE_BYTES // self.cluster_size))
        self.dirty_entries = set()
        self.file_size = file_size
        self.next_free = (file_size + self.cluster_size - 1) >> cluster_bits
        self.wrote = []
        if f.is_device:
            # a device is "file" to its end: what the image uses ends at its last
            # counted cluster, and new clusters go after it, up to the device's end
            self.next_free = self.counted_end()

    @property
    def offset(self):
        """Where the refcount table is (bytes)."""
        return self.table.offset

    @property
    def clusters(self):
        """The refcount table's size in clusters."""
        return self.table.nbytes >> self.cluster_bits

    def _err(self, msg):
        return ImageFormatError("%s: %s" % (self.file.path, msg))

    cdef Table block(self, int64_t idx):
        """Refcount block ``idx`` (read on first use), or None where the table has none."""
        cdef Table t = <Table>self.cache.get(idx)
        cdef uint64_t off
        if t is not None:
            return t
        if idx >= (self.table.nbytes >> 3):
            return None
        off = self.table.get(idx) & ~(<uint64_t>0x1FF)
        if off == 0:
            return None
        if off % self.cluster_size:
            raise self._err("refcount block offset 0x%x is not aligned" % off)
        if off + self.cluster_size > self.host_end():
            raise self._err("refcount block %d at 0x%x lies past the end of the file" % (idx, off))
        t = Table(off, self.cluster_size)
        self.file.read_full(t.buf, self.cluster_size, off)
        self.cache.put(idx, t)
        return t

    cdef uint64_t get(self, int64_t cluster) except? 0xFFFFFFFFFFFFFFFF:
        """Refcount of host cluster ``cluster`` (0 where no refcount block covers it)."""
        cdef Table t = self.block(cluster >> self.rb_bits)
        if t is None:
            return 0
        return rc_load(t.buf, self.refcount_order, cluster & (self.rb_entries - 1))

    cdef int add(self, int64_t cluster, int delta) except -1:
        """Change the count of ``cluster`` by ``delta`` in memory. Raises
        ImageFormatError when the count would drop below zero or exceed what the
        refcount width holds (never stored wrapped)."""
        cdef Table t = self.block(cluster >> self.rb_bits)
        cdef uint64_t v
        cdef int64_t i = cluster & (self.rb_entries - 1)
        if t is None:
            if delta < 0:
                raise self._err("freeing cluster %d that has no refcount block" % cluster)
            raise RuntimeError("refcount block missing for cluster %d" % cluster)
        v = rc_load(t.buf, self.refcount_order, i)
        if delta < 0 and v < <uint64_t>(-<int64_t>delta):
            raise self._err("refcount of cluster %d would drop below zero" % cluster)
        if delta > 0 and (<uint64_t>delta > self.rc_max or v > self.rc_max - <uint64_t>delta):
            raise self._err("refcount of cluster %d would overflow" % cluster)
        rc_store(t.buf, self.refcount_order, i, v + delta)
        t.dirty = True
        return 0

    # ---- allocation -------------------------------------------------------------------

    cdef int64_t alloc(self, int64_t n) except -1:
        """Count ``n`` free contiguous clusters (1 each) and return the first one's host
        offset (bytes); the refcount blocks they need are made first."""
        cdef int64_t start, c
        while True:
            start = self._find_free(n)
            for c in range(start, start + n):
                if self.block(c >> self.rb_bits) is None:
                    break
            else:
                break
            self._new_block(c >> self.rb_bits)
        self.next_free = start + n
        for c in range(start, start + n):
            self.add(c, 1)
        return start << self.cluster_bits

    cdef int _ensure_table(self, int64_t idx) except -1:
        """Grow the in-memory refcount table so that entry ``idx`` exists. The new table
        is written and switched to at the owner's next flush (``write_table``)."""
        cdef int64_t cs = self.cluster_size
        cdef int64_t entries = self.table.nbytes >> 3
        cdef int64_t new_clusters, start, c
        cdef Table nt
        if idx < entries:
            return 0
        new_clusters = (max(idx + 1, entries) * 2 * 8 + cs - 1) // cs
        if new_clusters * cs > MAX_REFTABLE_BYTES:
            raise self._err("image too large: refcount table would exceed %d bytes" % MAX_REFTABLE_BYTES)
        start = self.reserve(new_clusters)
        nt = Table(start << self.cluster_bits, new_clusters * cs)
        memcpy(nt.buf, self.table.buf, self.table.nbytes)
        if not self.moved:
            self.old_table = (self.table.offset, self.table.nbytes >> self.cluster_bits)
        else:
            # an unwritten replacement is replaced again: give its clusters back
            self.free_now(self.table.offset >> self.cluster_bits, self.table.nbytes >> self.cluster_bits)
        self.table = nt
        self.moved = True
        for c in range(start, start + new_clusters):
            self._count_new(c)
        return 0

    cdef int _count_new(self, int64_t c) except -1:
        """Set refcount 1 on a just-reserved cluster, creating its refcount block."""
        if self.block(c >> self.rb_bits) is None:
            self._new_block(c >> self.rb_bits)
        self.add(c, 1)
        return 0

    cdef int _new_block(self, int64_t idx) except -1:
        """Make refcount block ``idx`` (new, in memory), in a cluster it counts itself or
        another block does. Growing the table may already have made it."""
        cdef int64_t b
        cdef Table rb
        self._ensure_table(idx)
        if self.block(idx) is not None:
            return 0
        b = self.reserve(1)
        rb = Table(b << self.cluster_bits, self.cluster_size)
        rb.new = True
        rb.dirty = True
        self.cache.put(idx, rb)
        self.table.put(idx, <uint64_t>(b << self.cluster_bits))
        self.dirty_entries.add(idx)
        self._count_new(b)
        return 0

    cdef int64_t _find_free(self, int64_t n) except -1:
        """First cluster of a run of ``n`` free clusters at or after ``next_free``.

        Clusters past the end of the file are usually free, but not always: a crash can
        leave a refcount block durable while the data it counts never reached the file
        (a leak past the end). Counting such a cluster again would give it two counts
        for one reference, so every candidate's refcount is looked at. Raises OSError
        (ENOSPC) when the run would pass the end of a block device."""
        cdef int64_t start = self.next_free
        cdef int64_t c = start
        while c < start + n:
            if self.get(c) != 0:
                start = c + 1
            c += 1
        if self.file.is_device and (start + n) << self.cluster_bits > self.file_size:
            raise OSError(errno.ENOSPC, "no space left on block device: %d clusters at "
                          "0x%x pass its end (%d bytes)" % (n, start << self.cluster_bits,
                                                            self.file_size), self.file.path)
        return start

    cdef int64_t reserve(self, int64_t n) except -1:
        """Take ``n`` free contiguous clusters for metadata (not yet counted), with their
        space claimed on the file system (see ``claim``)."""
        cdef int64_t start = self._find_free(n)
        cdef int64_t old = self.next_free
        self.next_free = start + n
        try:
            self.claim(start, n)
        except OSError:
            self.next_free = old
            raise
        return start

    cdef int claim(self, int64_t c, int64_t n) except -1:
        """Write zeros over metadata clusters ``c .. c+n`` as soon as they are reserved.
        Metadata is written back later, at a flush point; on a full file system that
        write-back must not be the write that fails, or everything linked in memory since
        the last flush is lost with it. Claimed now, the space is there when the tables
        are written (and a full disk fails the allocation instead, before anything
        depends on it). Nothing points at these clusters yet."""
        cdef bytes z = bytes(n << self.cluster_bits)
        self.file.write_full(z, n << self.cluster_bits, c << self.cluster_bits)
        return 0

    cdef int free_now(self, int64_t c, int64_t n) except -1:
        """Drop the counts of clusters ``c .. c+n`` at once (in memory)."""
        cdef int64_t i
        for i in range(c, c + n):
            self.add(i, -1)
        return 0

    cdef int trim_tail(self) except -1:
        """Lower ``next_free`` over the free clusters at the end of what was allocated
        and cut the file there (never a block device). A cluster counted anywhere (in
        memory: data, tables, claimed metadata, a reference drop not yet durable) stops
        it."""
        cdef int64_t c = self.next_free
        cdef int64_t end
        while c > 1 and self.get(c - 1) == 0:
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

    cdef int64_t counted_end(self) except -1:
        """One past the last host cluster whose refcount is not zero."""
        cdef int64_t idx, i
        cdef Table t
        for idx in range((self.table.nbytes >> 3) - 1, -1, -1):
            t = self.block(idx)
            if t is None:
                continue
            for i in range(self.rb_entries - 1, -1, -1):
                if rc_load(t.buf, self.refcount_order, i) != 0:
                    return (idx << self.rb_bits) + i + 1
        return 1

    # ---- write-back (at the owner's flush point) -----------------------------------------

    cdef int write_blocks(self) except -1:
        """Write every dirty refcount block (recorded in ``wrote``); no sync."""
        cdef Table t
        for idx, t in self.cache.items():
            if t.dirty:
                self.file.write_full(t.buf, t.nbytes, t.offset)
                t.dirty = False
                self.wrote.append((idx, t))
        return 0

    cdef int write_grown(self) except -1:
        """Write a grown table whole (``moved``; the owner then switches the header to
        it and clears ``moved``); no sync."""
        if self.moved:
            self.file.write_full(self.table.buf, self.table.nbytes, self.table.offset)
        return 0

    cdef set write_entries(self):
        """Write the 512-byte sectors of the entries that name new blocks; no sync.
        Returns those entries' indexes (empty: nothing written)."""
        cdef set done = self.dirty_entries
        self.table.write_entries(self.file, done)
        self.dirty_entries = set()
        return done
