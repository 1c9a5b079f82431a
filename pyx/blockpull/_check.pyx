# cython: language_level=3
"""Consistency checking of qcow2 images: the loops that touch every table entry.

``Qcow2Check`` walks an image the way ``qemu-img check`` does and counts what it finds:

* every cluster in use gets an expected refcount: the header cluster, the refcount table
  and each refcount block, the snapshot table, each L1 table (active and one per snapshot),
  each L2 table once per L1 entry that points at it, each data cluster once per L2 entry
  (for a compressed cluster: every host cluster its compressed bytes touch), and the
  areas the caller names (bitmap directory, tables and data; the encryption header);
* the stored refcounts are read from the refcount blocks and compared: stored < expected is
  a corruption, stored > expected a leak;
* the active tables' COPIED flags must say "refcount is exactly 1" (a corruption otherwise),
  compressed entries never carry COPIED, offsets must be cluster aligned and inside the file.

Memory is bounded by the file, not by the virtual size: one 32-bit expected count, one
64-bit stored count and one role byte per host cluster of the file, plus one table buffer.
References past the end of the file are counted as corruptions where they are found and
never grow those arrays.

``parse_snapshot_table`` (blockpull._q2header) reads the snapshot table with every field
bounded; the driver's header parse uses it at open time, the checker to find the
snapshots' L1 tables.
"""
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint8_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free, calloc

from blockpull._fileio cimport File
from blockpull._endian cimport ld_be64 as ld64, st_be64 as st64
from blockpull._q2compress cimport comp_extent
from blockpull._q2refcount cimport rc_load, rc_store

# one parse of the snapshot table and its limits serves the driver and the checker
from blockpull._q2header import (parse_snapshot_table, MAX_L1_BYTES, MAX_SNAPSHOTS_BYTES,
                                 MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA)

cdef uint64_t OFFSET_MASK = 0x00FFFFFFFFFFFE00ULL
cdef uint64_t COPIED = 1ULL << 63
cdef uint64_t COMPRESSED_FLAG = 1ULL << 62
cdef uint64_t ZERO_FLAG = 1ULL
cdef uint64_t L1_RESERVED = 0x7F000000000001FFULL
cdef uint64_t RT_RESERVED = 0x1FFULL

#: messages kept in a result; the rest are counted
MAX_MESSAGES = 1000

# what a host cluster is used for (first user wins; a second, different user is an overlap)
cdef enum:
    R_NONE = 0
    R_HEADER = 1
    R_L1 = 2
    R_L2 = 3
    R_REFTABLE = 4
    R_REFBLOCK = 5
    R_SNAPTABLE = 6
    R_DATA = 7
    R_COMPRESSED = 8
    R_BITMAP_DIRECTORY = 9
    R_BITMAP_TABLE = 10
    R_BITMAP_DATA = 11
    R_CRYPTO_HEADER = 12

ROLE_NAMES = ["unused", "header", "L1 table", "L2 table", "refcount table",
              "refcount block", "snapshot table", "data cluster", "compressed data",
              "bitmap directory", "bitmap table", "bitmap data", "encryption header"]
#: roles of the other areas ``Qcow2Check.run`` may be given, by name
AREA_ROLES = {"bitmap directory": R_BITMAP_DIRECTORY, "bitmap table": R_BITMAP_TABLE,
              "bitmap data": R_BITMAP_DATA, "encryption header": R_CRYPTO_HEADER}


cdef class Qcow2Check:
    """One check of one qcow2 file; see the module docstring. Use ``run()``."""
    cdef File f
    cdef object path
    cdef int cluster_bits
    cdef int64_t cs
    cdef int64_t file_size
    cdef int64_t nb                  # host clusters of the file
    cdef int version
    cdef int refcount_order
    cdef int entry_bytes             # 8, or 16 with extended L2 entries
    cdef int64_t rb_entries
    cdef uint32_t* expected
    cdef uint64_t* stored
    cdef uint8_t* role
    cdef unsigned char* buf          # one cluster
    cdef public int64_t corruptions
    cdef public int64_t leaks
    cdef public int64_t check_errors
    cdef public int64_t skipped      # tables whose references could not be counted
    cdef public int64_t allocated_clusters
    cdef public int64_t compressed_clusters
    cdef public int64_t highest
    cdef public list messages
    cdef public int64_t dropped_messages
    cdef public int64_t fragmented_clusters   # as qemu-img check counts them (active L1)
    cdef public object hdr           # dict of header fields
    cdef bint ext_data               # data clusters in an external data file, not counted
    cdef uint64_t l1i                # the L1 index of the L2 table walk_l2 reads

    def __cinit__(self):
        self.expected = NULL
        self.stored = NULL
        self.role = NULL
        self.buf = NULL

    def __init__(self, File f, dict hdr, int64_t file_size):
        self.f = f
        self.path = f.path
        self.hdr = hdr
        self.cluster_bits = hdr["cluster_bits"]
        self.cs = 1LL << self.cluster_bits
        self.version = hdr["version"]
        self.refcount_order = hdr["refcount_order"]
        self.entry_bytes = 16 if hdr.get("extended_l2") else 8
        self.ext_data = bool(hdr.get("external_data"))
        self.rb_entries = (self.cs * 8) >> self.refcount_order
        self.file_size = file_size
        self.nb = (file_size + self.cs - 1) >> self.cluster_bits
        self.messages = []
        self.dropped_messages = 0
        self.highest = -1
        n = self.nb if self.nb > 0 else 1
        self.expected = <uint32_t*>calloc(n, sizeof(uint32_t))
        self.stored = <uint64_t*>calloc(n, sizeof(uint64_t))
        self.role = <uint8_t*>calloc(n, 1)
        self.buf = <unsigned char*>malloc(self.cs)
        if not (self.expected and self.stored and self.role and self.buf):
            raise MemoryError()

    def __dealloc__(self):
        free(self.expected)
        free(self.stored)
        free(self.role)
        free(self.buf)

    # ---- reporting ------------------------------------------------------------------

    cdef void msg(self, str text):
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(text)
        else:
            self.dropped_messages += 1

    cdef void corrupt(self, str text):
        self.corruptions += 1
        self.msg("ERROR " + text)

    # ---- expected refcounts -----------------------------------------------------------

    cdef int add(self, uint64_t offset, uint64_t size, int what) except -1:
        """Count one reference to every cluster of [offset, offset + size)."""
        cdef uint64_t first, last, c
        cdef int r
        if size == 0:
            return 0
        first = offset >> self.cluster_bits
        last = (offset + size - 1) >> self.cluster_bits
        if offset + size < offset:  # wrapped: a garbage length
            self.corrupt("%s at 0x%x: size %d overflows" % (ROLE_NAMES[what], offset, size))
            return 0
        c = first
        while c <= last:
            if c >= <uint64_t>self.nb:
                self.corrupt("%s at 0x%x lies past the end of the file (size %d)"
                             % (ROLE_NAMES[what], c << self.cluster_bits, self.file_size))
                return 0
            r = self.role[c]
            if r == R_NONE:
                self.role[c] = what
            elif r != what or what not in (R_L2, R_DATA, R_COMPRESSED):
                # L2 tables and data may be shared between snapshots; nothing else may be
                self.msg("overlap: %s at 0x%x is also used as %s"
                         % (ROLE_NAMES[what], c << self.cluster_bits, ROLE_NAMES[r]))
            if self.expected[c] == 0xFFFFFFFFU:
                self.corrupt("too many references to cluster 0x%x" % (c << self.cluster_bits))
            else:
                self.expected[c] += 1
            c += 1
        return 0

    cdef bint readable(self, uint64_t off, uint64_t n, str what):
        """Is [off, off+n) cluster aligned and inside the file? Counts a corruption if not."""
        if off & (self.cs - 1):
            self.corrupt("%s offset 0x%x is not cluster aligned" % (what, off))
            return False
        if off + n > <uint64_t>self.file_size or off + n < off:
            self.corrupt("%s at 0x%x (%d bytes) lies past the end of the file" % (what, off, n))
            return False
        return True

    cdef int read(self, unsigned char* out, int64_t n, int64_t off, str what) except -1:
        """Read, turning an I/O error into a check error; 0 on success, 1 on error."""
        try:
            self.f.read_full(out, n, off)
        except OSError as exc:
            self.check_errors += 1
            self.msg("ERROR reading %s at 0x%x: %s" % (what, off, exc))
            return 1
        return 0

    cdef int walk_l1(self, uint64_t l1_off, uint64_t l1_size, bint active, str label) except -1:
        """Count the L1 table, its L2 tables and their clusters."""
        cdef unsigned char* l1
        cdef uint64_t i, e, l2_off
        cdef int64_t nbytes
        if l1_size == 0:
            return 0
        if l1_size * 8 > MAX_L1_BYTES:
            self.corrupt("%s L1 table has %d entries, more than %d" % (label, l1_size, MAX_L1_BYTES // 8))
            self.skipped += 1
            return 0
        nbytes = l1_size * 8
        if not self.readable(l1_off, nbytes, label + " L1 table"):
            self.skipped += 1
            return 0
        self.add(l1_off, nbytes, R_L1)
        l1 = <unsigned char*>malloc(nbytes)
        if l1 == NULL:
            raise MemoryError()
        try:
            if self.read(l1, nbytes, l1_off, label + " L1 table"):
                return 0
            for i in range(l1_size):
                e = ld64(l1 + 8 * i)
                if e == 0:
                    continue
                if e & L1_RESERVED:
                    self.corrupt("%s L1 entry %d has reserved bits set (0x%x)" % (label, i, e))
                l2_off = e & OFFSET_MASK
                if l2_off == 0:
                    continue
                # counted first, as QEMU does, so that what it overlaps shows up too
                self.add(l2_off, self.cs, R_L2)
                if l2_off & (self.cs - 1):
                    self.corrupt("l2_offset=0x%x: %s L2 table is not cluster aligned; L1 entry "
                                 "%d corrupted" % (l2_off, label, i))
                    self.skipped += 1
                    continue
                if l2_off + self.cs > <uint64_t>self.file_size:
                    self.skipped += 1
                    continue  # add() counted it
                if self.read(self.buf, self.cs, l2_off, "L2 table"):
                    continue
                self.l1i = i
                self.walk_l2(l2_off, active)
        finally:
            free(l1)
        return 0

    cdef int walk_l2(self, uint64_t l2_off, bint active) except -1:
        cdef int64_t j, n = self.cs // self.entry_bytes
        cdef uint64_t e, off, coff, csize
        # fragmentation as qemu-img check counts it: within one L2 table, a data cluster
        # that does not follow the previous one in the file; a compressed one always
        cdef uint64_t next_contiguous = 0
        if self.ext_data:
            return self.walk_l2_ext(l2_off, active)
        for j in range(n):
            e = ld64(self.buf + self.entry_bytes * j)
            if self.entry_bytes == 16:
                self.subcluster_rules(l2_off, j, e, ld64(self.buf + 16 * j + 8))
            if e == 0:
                continue
            if e & COMPRESSED_FLAG:
                if e & COPIED:
                    self.corrupt("L2 table 0x%x entry %d: compressed cluster with COPIED set"
                                 % (l2_off, j))
                comp_extent(e, self.cluster_bits, &coff, &csize)
                if active:
                    self.allocated_clusters += 1
                    self.compressed_clusters += 1
                    self.fragmented_clusters += 1
                self.add(coff, csize, R_COMPRESSED)
                continue
            off = e & OFFSET_MASK
            if off == 0:
                continue  # unallocated or zero cluster without space
            if active:
                self.allocated_clusters += 1
                if next_contiguous and off != next_contiguous:
                    self.fragmented_clusters += 1
                next_contiguous = off + self.cs
            if off & (self.cs - 1):
                self.corrupt("offset=0x%x: data cluster is not properly aligned; L2 entry "
                             "corrupted (L2 table 0x%x entry %d)" % (off, l2_off, j))
            self.add(off, self.cs, R_DATA)
        return 0

    cdef int subcluster_rules(self, uint64_t l2_off, int64_t j, uint64_t e,
                              uint64_t bm) except -1:
        """The rules of an extended L2 entry's subcluster bitmap (QEMU's
        docs/interop/qcow2.rst, "Extended L2 Entries"): 0 for a compressed cluster; no
        allocated subcluster without a host offset; no subcluster both allocated and
        zero. Each broken rule is a corruption, worded as ``qemu-img check`` words it
        (the cluster's references are still counted, so that a repair of leaks never
        frees data an entry names)."""
        if e & COMPRESSED_FLAG:
            if bm:
                self.corrupt("compressed cluster with non-zero subcluster allocation "
                             "bitmap, entry=0x%x (L2 table 0x%x entry %d)" % (e, l2_off, j))
        elif (e & OFFSET_MASK) == 0 and bm & 0xFFFFFFFFULL:
            self.corrupt("Unallocated cluster has non-zero subcluster allocation map "
                         "(L2 table 0x%x entry %d)" % (l2_off, j))
        elif (bm >> 32) & bm & 0xFFFFFFFFULL:
            self.corrupt("offset=0x%x: Allocated cluster has corrupted subcluster "
                         "allocation bitmap (L2 table 0x%x entry %d)"
                         % (e & OFFSET_MASK, l2_off, j))

    cdef inline bint zero_flag(self, uint64_t e) noexcept:
        """A standard v3 L2 entry's "reads as zeros" bit (bit 0; reserved with extended
        L2 entries)."""
        return self.version == 3 and self.entry_bytes == 8 and (e & ZERO_FLAG) != 0

    cdef int walk_l2_ext(self, uint64_t l2_off, bint active) except -1:
        """``walk_l2`` for an image with an external data file (QEMU's
        docs/interop/qcow2.rst, "Header", incompatible bit 2): its data clusters live in
        the data file and are not refcounted here; each entry must name its cluster's
        guest offset (offset 0 with COPIED for cluster 0), and none is compressed."""
        cdef int64_t j, n = self.cs // self.entry_bytes
        cdef uint64_t e, off, guest
        cdef uint64_t next_contiguous = 0
        for j in range(n):
            e = ld64(self.buf + self.entry_bytes * j)
            if e & COMPRESSED_FLAG:
                self.corrupt("L2 table 0x%x entry %d: compressed cluster in an image with an "
                             "external data file" % (l2_off, j))
                continue
            off = e & OFFSET_MASK
            if off == 0 and (not (e & COPIED) or self.zero_flag(e)):
                continue  # unallocated or zero cluster without space
            guest = (self.l1i * <uint64_t>n + <uint64_t>j) << self.cluster_bits
            if off != guest:
                self.corrupt("L2 table 0x%x entry %d: data cluster at 0x%x of the external "
                             "data file, not at its guest offset 0x%x" % (l2_off, j, off, guest))
            if active:
                self.allocated_clusters += 1
                if next_contiguous and off != next_contiguous:
                    self.fragmented_clusters += 1
                next_contiguous = off + self.cs
        return 0

    # ---- stored refcounts -------------------------------------------------------------

    cdef int load_refcounts(self) except -1:
        """Read every refcount block the table names into ``stored``; count the table and
        the blocks as references."""
        cdef uint64_t rt_off = self.hdr["refcount_table_offset"]
        cdef int64_t rt_bytes = self.hdr["refcount_table_clusters"] * self.cs
        cdef unsigned char* rt
        cdef int64_t i, j, base, lim
        cdef uint64_t e, off
        if not self.readable(rt_off, rt_bytes, "refcount table"):
            return 0
        self.add(rt_off, rt_bytes, R_REFTABLE)
        rt = <unsigned char*>malloc(rt_bytes)
        if rt == NULL:
            raise MemoryError()
        try:
            if self.read(rt, rt_bytes, rt_off, "refcount table"):
                return 0
            for i in range(rt_bytes >> 3):
                e = ld64(rt + 8 * i)
                if e == 0:
                    continue
                if e & RT_RESERVED:
                    self.corrupt("refcount table entry %d has reserved bits set (0x%x)" % (i, e))
                    continue
                off = e
                if off & (self.cs - 1):
                    self.corrupt("refcount block %d offset 0x%x is not cluster aligned" % (i, off))
                    continue
                if off + self.cs > <uint64_t>self.file_size:
                    self.corrupt("refcount block %d at 0x%x is outside the image" % (i, off))
                    continue
                self.add(off, self.cs, R_REFBLOCK)
                if self.expected[off >> self.cluster_bits] != 1:
                    self.corrupt("refcount block %d at 0x%x has %d references, not 1"
                                 % (i, off, self.expected[off >> self.cluster_bits]))
                if self.read(self.buf, self.cs, off, "refcount block"):
                    continue
                base = i * self.rb_entries
                if base >= self.nb:
                    continue
                lim = min(self.rb_entries, self.nb - base)
                for j in range(lim):
                    self.stored[base + j] = rc_load(self.buf, self.refcount_order, j)
        finally:
            free(rt)
        return 0

    # ---- comparison ---------------------------------------------------------------------

    cdef int compare(self) except -1:
        cdef int64_t i
        cdef uint64_t s, x
        self.highest = -1
        for i in range(self.nb):
            s = self.stored[i]
            x = self.expected[i]
            if s or x:
                self.highest = i
            if s == x:
                continue
            if s < x:
                self.corruptions += 1
                self.msg("ERROR cluster %d refcount=%d reference=%d" % (i, s, x))
            else:
                self.leaks += 1
                self.msg("Leaked cluster %d refcount=%d reference=%d" % (i, s, x))
        return 0

    cdef int check_copied(self, set fixable, list fixes, bint all_flags=False) except -1:
        """COPIED must be set exactly where the refcount is 1, in the active tables.
        Entries whose cluster is in ``fixable`` and lacks COPIED are queued in ``fixes``
        as (file offset of the entry, new entry) instead of being counted; with
        ``all_flags``, every entry whose flag is wrong, either way (QEMU's
        check_oflag_copied with BDRV_FIX_ERRORS)."""
        cdef uint64_t l1_off = self.hdr["l1_table_offset"]
        cdef uint64_t l1_size = self.hdr["l1_size"]
        cdef unsigned char* l1
        cdef uint64_t i, e, l2_off, off, rc, c
        cdef int64_t j
        if l1_size == 0 or l1_size * 8 > MAX_L1_BYTES:
            return 0
        if l1_off & (self.cs - 1) or l1_off + l1_size * 8 > <uint64_t>self.file_size:
            return 0
        l1 = <unsigned char*>malloc(l1_size * 8)
        if l1 == NULL:
            raise MemoryError()
        try:
            if self.read(l1, l1_size * 8, l1_off, "L1 table"):
                return 0
            for i in range(l1_size):
                e = ld64(l1 + 8 * i)
                l2_off = e & OFFSET_MASK
                if l2_off == 0:
                    continue
                c = l2_off >> self.cluster_bits
                rc = self.stored[c] if c < <uint64_t>self.nb else 0
                if (rc == 1) != ((e & COPIED) != 0):
                    if all_flags or (rc == 1 and c in fixable):
                        fixes.append((l1_off + 8 * i, e ^ COPIED))
                    else:
                        self.corrupt("OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d"
                                     % (i, e, rc))
                if l2_off & (self.cs - 1) or l2_off + self.cs > <uint64_t>self.file_size:
                    continue  # counted by walk_l1
                if self.read(self.buf, self.cs, l2_off, "L2 table"):
                    continue
                for j in range(self.cs // self.entry_bytes):
                    e = ld64(self.buf + self.entry_bytes * j)
                    if e & COMPRESSED_FLAG:
                        continue
                    off = e & OFFSET_MASK
                    if off == 0 and not (self.ext_data and e & COPIED and not self.zero_flag(e)):
                        continue
                    c = off >> self.cluster_bits
                    rc = self.stored[c] if c < <uint64_t>self.nb else 0
                    if self.ext_data:
                        rc = 1      # a data file's cluster: one owner, not counted
                    if (rc == 1) != ((e & COPIED) != 0):
                        if all_flags or (rc == 1 and c in fixable):
                            fixes.append((l2_off + self.entry_bytes * j, e ^ COPIED))
                        else:
                            self.corrupt("OFLAG_COPIED data cluster: l2_entry=%x refcount=%d"
                                         % (e, rc))
        finally:
            free(l1)
        return 0

    # ---- the whole check ------------------------------------------------------------------

    def run(self, list snapshots, list areas=None):
        """Count references, load and compare refcounts; COPIED flags are checked by
        ``check_flags`` (after an optional leak repair). ``areas``: the other structures
        that use clusters, as ``(offset, nbytes, role name)`` with a name from
        ``AREA_ROLES`` (the bitmap directory, tables and data, the encryption header)."""
        h = self.hdr
        for (off, nbytes, what) in (areas or ()):
            if self.readable(off, nbytes, what):
                self.add(off, nbytes, AREA_ROLES[what])
        self.add(0, self.cs, R_HEADER)
        self.walk_l1(h["l1_table_offset"], h["l1_size"], True, "active")
        for (l1_off, l1_size, sid, name, _pos) in snapshots:
            label = "snapshot %s (%s)" % (sid, name)
            if l1_off & (self.cs - 1):
                self.corrupt("%s l1_offset=0x%x: L1 table is not cluster aligned; snapshot "
                             "table entry corrupted" % (label, l1_off))
                self.skipped += 1
                continue
            if l1_size * 8 > MAX_L1_BYTES:
                self.corrupt("%s l1_size=%d: L1 table is too large; snapshot table entry "
                             "corrupted" % (label, l1_size))
                self.skipped += 1
                continue
            self.walk_l1(l1_off, l1_size, False, label)
        if snapshots:
            self.add(h["snapshots_offset"], h["snapshots_size"], R_SNAPTABLE)
        self.load_refcounts()
        self.compare()

    def check_flags(self, fixable=None, bint all_flags=False):
        """Check COPIED flags against the stored refcounts; returns the (entry offset,
        new entry) fixes for clusters in ``fixable`` (a set of host cluster numbers) or,
        with ``all_flags``, for every entry: COPIED set where the count is 1, cleared
        where it is not (QEMU's docs/interop/qcow2.rst, "Cluster mapping")."""
        fixes = []
        self.check_copied(fixable if fixable is not None else set(), fixes, all_flags)
        return fixes

    def leaked_blocks(self):
        """Leak repairs, by refcount block: a list of (block offset, new block bytes,
        [host clusters whose count drops]) for every block holding a leaked cluster."""
        return self._blocks_to_fix(False)

    def recounted_blocks(self):
        """Every count set to the references found (the repair of an image left dirty
        by a writer with lazy refcounts): a list of (block offset, new block bytes,
        [host clusters whose count changes]) for every block with a count that differs,
        too high or too low. Clusters in use that no valid refcount block covers are
        not in it (``uncovered``)."""
        return self._blocks_to_fix(True)

    def uncovered(self):
        """Host clusters in use whose refcount block is missing or invalid: a list."""
        cdef uint64_t rt_off = self.hdr["refcount_table_offset"]
        cdef int64_t rt_bytes = self.hdr["refcount_table_clusters"] * self.cs
        cdef int64_t c, idx
        cdef uint64_t off
        cdef bytes rt = b""
        if not (rt_off & (self.cs - 1) or rt_off + rt_bytes > <uint64_t>self.file_size):
            rt = self.f.pread(rt_off, rt_bytes)
        out = []
        for c in range(self.nb):
            if self.expected[c] == 0:
                continue
            idx = c // self.rb_entries
            off = ld64(<const unsigned char*><char*>rt + 8 * idx) if 8 * idx + 8 <= len(rt) else 0
            if (off == 0 or off & (self.cs - 1) or off & RT_RESERVED or
                    off + self.cs > <uint64_t>self.file_size):
                out.append(c)
        return out

    cdef list _blocks_to_fix(self, bint all_counts):
        cdef uint64_t rt_off = self.hdr["refcount_table_offset"]
        cdef int64_t rt_bytes = self.hdr["refcount_table_clusters"] * self.cs
        cdef int64_t i, j, base, lim
        cdef uint64_t off
        cdef bytearray block
        cdef bytes rt
        cdef unsigned char* b
        out = []
        if rt_off & (self.cs - 1) or rt_off + rt_bytes > <uint64_t>self.file_size:
            return out
        rt = self.f.pread(rt_off, rt_bytes)
        for i in range(rt_bytes >> 3):
            base = i * self.rb_entries
            if base >= self.nb:
                break
            off = ld64(<const unsigned char*><char*>rt + 8 * i)
            if off == 0 or off & (self.cs - 1) or off + self.cs > <uint64_t>self.file_size:
                continue
            lim = min(self.rb_entries, self.nb - base)
            dropped = []
            for j in range(lim):
                if self.stored[base + j] > self.expected[base + j] or (
                        all_counts and self.stored[base + j] != self.expected[base + j]):
                    dropped.append(base + j)
            if not dropped:
                continue
            block = bytearray(self.f.pread(off, self.cs))
            b = <unsigned char*>(<char*>block)
            for c in dropped:
                rc_store(b, self.refcount_order, c - base, self.expected[c])
            out.append((off, bytes(block), dropped))
        return out

    def set_stored(self, int64_t c, uint64_t v):
        """Record that host cluster ``c`` now has refcount ``v`` on disk."""
        if 0 <= c < self.nb:
            self.stored[c] = v

    def stored_count(self, int64_t c):
        """The refcount of host cluster ``c`` as ``run`` read it (or ``set_stored`` set)."""
        return self.stored[c] if 0 <= c < self.nb else 0

    def expected_count(self, int64_t c):
        """The number of references to host cluster ``c`` found by ``run``."""
        return self.expected[c] if 0 <= c < self.nb else 0

    # ---- a refcount structure rebuilt after the end of the file ---------------------------

    cdef inline bint old_structure(self, int64_t c) noexcept:
        return self.role[c] == R_REFTABLE or self.role[c] == R_REFBLOCK

    def rebuild_in_use(self):
        """The refcount block indexes a rebuilt refcount structure needs for the file as
        it is: a list of every index whose clusters include one in use, the refcount
        table and blocks named by the header not counted (they are replaced)."""
        cdef int64_t c, last = -1
        out = []
        for c in range(self.nb):
            if self.expected[c] and not self.old_structure(c) and c // self.rb_entries != last:
                last = c // self.rb_entries
                out.append(last)
        return out

    def rebuilt_block(self, int64_t idx, int64_t new_start, int64_t new_end):
        """Refcount block ``idx`` of a refcount structure rebuilt after the end of the
        file (QEMU's rebuild_refcount_structure does the same): every host cluster of
        the file counted as ``run`` found it, except the refcount table and blocks it
        replaces (0: free once the header names the new ones); clusters ``new_start`` to
        ``new_end`` (the new blocks and table) counted once. The counts become the stored
        ones for ``check_flags``. Returns (block bytes, counts raised, counts lowered,
        counts that were too low, highest count)."""
        cdef bytearray block = bytearray(self.cs)
        cdef unsigned char* b = <unsigned char*>(<char*>block)
        cdef int64_t c, j, raised = 0, lowered = 0, low = 0
        cdef uint64_t v, top = 0
        for j in range(self.rb_entries):
            c = idx * self.rb_entries + j
            if c < self.nb:
                v = 0 if self.old_structure(c) else self.expected[c]
                raised += v > self.stored[c]
                lowered += v < self.stored[c]
                low += self.stored[c] < self.expected[c]
                self.stored[c] = v
            else:
                v = 1 if new_start <= c < new_end else 0
            if v:
                top = max(top, v)
                rc_store(b, self.refcount_order, j, v)
        return bytes(block), raised, lowered, low, top
