# cython: language_level=3
"""Persistent dirty bitmaps of a qcow2 image (QEMU's docs/interop/qcow2.rst, sections
"Bitmaps extension", "Bitmap directory", "Bitmap table", "Bitmap data").

The bitmaps extension (``u32 nb_bitmaps, u32 reserved, u64 directory_size,
u64 directory_offset``) names the bitmap directory; each directory entry names a bitmap
table (one u64 per data cluster: a cluster offset, or 0 = all clean, 1 = all dirty); bit
``k`` of a bitmap (``byte k / 8``, bit ``k % 8`` from the least significant) covers the
guest bytes ``[k * granularity, (k + 1) * granularity)``. The whole structure is valid
only while autoclear bit 0 is set.

``parse_bitmaps`` reads and validates the structure, every length bounded by the file
(the checker counts its clusters with it). ``Bitmaps`` keeps the enabled bitmaps (flag
``auto``) of a writable image up to date the way QEMU does:

* nothing is written until the first guest write (a pull changes no byte the guest
  reads, so it leaves every bitmap as it is);
* before that write reaches the disk, every enabled bitmap is flagged ``in_use``
  (durably: the caller syncs); the bits the writes touch are set in memory, one bitmap
  data cluster at a time, loaded only when touched;
* on a flush the touched data clusters are written (in place, or into newly allocated
  clusters where the table said "all clean"), the caller makes them and their refcounts
  durable, then the table entries that point at new clusters are written and synced,
  and only then is ``in_use`` cleared.

A crash in between leaves the enabled bitmaps flagged ``in_use``: QEMU then reports them
inconsistent, exactly as after a crash of QEMU itself; never a bitmap that misses a write.
Disabled bitmaps are never written.
"""
from libc.stdint cimport int64_t, uint64_t, uint8_t

import struct

from blockpull.errors import ImageFormatError, InconsistentBitmapError

#: autoclear feature bit 0: the bitmaps extension is consistent
AUTOCLEAR_BITMAPS = 1
FLAG_IN_USE = 1
FLAG_AUTO = 2
#: flags QEMU accepts; anything else in a directory entry is not understood
KNOWN_FLAGS = FLAG_IN_USE | FLAG_AUTO
TYPE_DIRTY_TRACKING = 1
TABLE_RESERVED = 0xFF000000000001FE
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ALL_ONES = 1
#: QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c)
MAX_BITMAPS = 65535
MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
MAX_TABLE_ENTRIES = 0x8000000
MAX_DATA_BYTES = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_BYTES = 1023


cdef class Bitmap:
    """One directory entry. ``entry_offset`` is the file offset of the entry (its flags
    lie 12 bytes in); ``table`` the bitmap table as a list of raw entries."""
    cdef public str name
    cdef public int64_t entry_offset
    cdef public unsigned int flags
    cdef public int granularity_bits
    cdef public int64_t table_offset
    cdef public int64_t table_size
    cdef public list table
    cdef public dict chunks        # table index -> bytearray(cluster) being changed
    cdef public set dirty          # table indexes whose chunk differs from the disk
    cdef public set pending        # table indexes whose new entry is not yet written

    @property
    def enabled(self):
        return bool(self.flags & FLAG_AUTO)

    @property
    def in_use(self):
        return bool(self.flags & FLAG_IN_USE)

    def data_clusters(self):
        """Host offsets of the data clusters the table points at."""
        return [e & TABLE_OFFSET_MASK for e in self.table if e & TABLE_OFFSET_MASK]


def _err(path, msg):
    return ImageFormatError("%s: %s" % (path, msg))


def _parse_entry(f, d, pos, doff, cs, size, file_size, set names, bint full, nb):
    """The directory entry at ``pos`` of directory ``d`` (at ``doff``), checked, with its
    bitmap table read: ``(Bitmap, entry size in bytes)``. ``full``: the directory already
    holds the ``nb`` entries the extension names. Raises ImageFormatError."""
    path = f.path
    dsize = len(d)
    if pos + 24 > dsize:
        raise _err(path, "bitmap directory entry at 0x%x overruns the directory" % (doff + pos))
    toff, tsize, flags, btype, gbits, nsize, xsize = struct.unpack(">QIIBBHI", d[pos:pos + 24])
    esize = (24 + xsize + nsize + 7) & ~7
    if pos + esize > dsize:
        raise _err(path, "bitmap directory entry at 0x%x overruns the directory" % (doff + pos))
    name = d[pos + 24 + xsize:pos + 24 + xsize + nsize].decode("utf-8", "replace")
    label = "bitmap %r" % name
    if full:
        raise _err(path, "bitmap directory holds more entries than the %d the header "
                   "extension names" % nb)
    if xsize:
        raise _err(path, "%s has %d bytes of extra data, which is not understood" % (label, xsize))
    if btype != TYPE_DIRTY_TRACKING:
        raise _err(path, "%s has type %d, not 1 (dirty tracking)" % (label, btype))
    if flags & ~KNOWN_FLAGS:
        raise _err(path, "%s has unknown flags 0x%x" % (label, flags))
    if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
        raise _err(path, "%s has granularity bits %d (9..31)" % (label, gbits))
    if nsize == 0 or nsize > MAX_NAME_BYTES:
        raise _err(path, "bitmap name of %d bytes (1..1023)" % nsize)
    if name in names:
        raise _err(path, "two bitmaps are named %r" % name)
    names.add(name)
    if tsize == 0 or tsize > MAX_TABLE_ENTRIES or tsize * cs > MAX_DATA_BYTES:
        raise _err(path, "%s has a bitmap table of %d entries" % (label, tsize))
    if toff == 0 or toff % cs or toff + tsize * 8 > file_size:
        raise _err(path, "%s: bitmap table at 0x%x (%d entries) is unaligned or lies past "
                   "the end of the file" % (label, toff, tsize))
    if not flags & FLAG_IN_USE and size > ((tsize * cs * 8) << gbits):
        raise _err(path, "%s: bitmap table of %d entries is too small for the virtual "
                   "size %d" % (label, tsize, size))
    raw = f.pread(toff, tsize * 8)
    table = [e for (e,) in struct.iter_unpack(">Q", raw)]
    for i, e in enumerate(table):
        off = e & TABLE_OFFSET_MASK
        if e & TABLE_RESERVED or (off and e & TABLE_ALL_ONES):
            raise _err(path, "%s: bitmap table entry %d has reserved bits set (0x%x)"
                       % (label, i, e))
        if off and (off % cs or off + cs > file_size):
            raise _err(path, "%s: bitmap data cluster 0x%x is unaligned or lies past the "
                       "end of the file" % (label, off))
    bm = Bitmap()
    bm.name = name
    bm.entry_offset = doff + pos
    bm.flags = flags
    bm.granularity_bits = gbits
    bm.table_offset = toff
    bm.table_size = tsize
    bm.table = table
    bm.chunks = {}
    bm.dirty = set()
    bm.pending = set()
    return bm, esize


def parse_bitmaps(f, bytes ext, int cluster_bits, int64_t size, int64_t file_size):
    """Read the bitmap directory and tables that the bitmaps extension ``ext`` (its data)
    describes: ``(directory_offset, directory_size, [Bitmap...])``.

    Every rule QEMU applies when it loads bitmaps is applied here (block/qcow2-bitmap.c):
    extension length 24 with the reserved field zero, 1..65535 bitmaps, a directory of at
    most 64 MiB that the entries fill exactly, no extra data, type 1, granularity bits
    9..31, no unknown flags, a name of 1..1023 bytes, tables and data clusters cluster
    aligned and inside the file, no reserved bits in a table entry, and (unless in use) a
    table large enough for the virtual size. Raises ImageFormatError naming the file and
    what is wrong."""
    cs = 1 << cluster_bits     # Python integers: every field is checked before use
    path = f.path
    if len(ext) != 24:
        raise _err(path, "bitmaps header extension has %d bytes, not 24" % len(ext))
    nb, reserved, dsize, doff = struct.unpack(">IIQQ", ext)
    if reserved:
        raise _err(path, "bitmaps header extension: reserved field is 0x%x, not 0" % reserved)
    if nb == 0 or nb > MAX_BITMAPS:
        raise _err(path, "bitmaps header extension names %d bitmaps (1..%d)" % (nb, MAX_BITMAPS))
    if dsize == 0 or dsize > MAX_DIRECTORY_BYTES:
        raise _err(path, "bitmap directory size %d invalid" % dsize)
    if doff == 0 or doff % cs or doff + dsize > file_size:
        raise _err(path, "bitmap directory at 0x%x (%d bytes) is unaligned or lies past the "
                   "end of the file" % (doff, dsize))
    d = f.pread(doff, dsize)
    out = []
    names = set()
    pos = 0
    while pos < dsize:
        bm, esize = _parse_entry(f, d, pos, doff, cs, size, file_size, names,
                                 len(out) == nb, nb)
        out.append(bm)
        pos += esize
    if len(out) != nb:
        raise _err(path, "bitmap directory holds %d entries, the header extension names %d"
                   % (len(out), nb))
    return doff, dsize, out


cdef bint set_bits(unsigned char* p, int64_t lo, int64_t hi) noexcept:
    """Set bits lo..hi (inclusive, least significant bit of each byte first); True when
    any was clear."""
    cdef int64_t b0 = lo >> 3, b1 = hi >> 3, i
    cdef unsigned char m, old
    cdef bint changed = False
    if b0 == b1:
        m = <unsigned char>(((0xFF << (lo & 7)) & (0xFF >> (7 - (hi & 7)))) & 0xFF)
        old = p[b0]
        p[b0] = old | m
        return (old | m) != old
    m = <unsigned char>((0xFF << (lo & 7)) & 0xFF)
    old = p[b0]
    p[b0] = old | m
    changed = (old | m) != old
    for i in range(b0 + 1, b1):
        if p[i] != 0xFF:
            p[i] = 0xFF
            changed = True
    m = <unsigned char>(0xFF >> (7 - (hi & 7)))
    old = p[b1]
    p[b1] = old | m
    return changed or (old | m) != old


cdef class Bitmaps:
    """The persistent bitmaps of one writable qcow2 image, kept up to date (see the
    module docstring). Raises InconsistentBitmapError for a bitmap flagged ``in_use``
    and ImageFormatError for a structure it does not understand: writing to such an
    image would leave a bitmap that silently misses writes."""
    cdef object f
    cdef int cluster_bits
    cdef int64_t cs
    cdef int64_t size
    cdef readonly list bitmaps
    cdef readonly list enabled
    cdef readonly bint active       # the enabled bitmaps' in_use flags are written

    def __init__(self, f, bytes ext, int cluster_bits, int64_t size, int64_t file_size,
                 refcount):
        cdef Bitmap bm
        cdef int64_t need, c, cs = 1LL << cluster_bits
        path = f.path
        self.f = f
        self.cluster_bits = cluster_bits
        self.cs = cs
        self.size = size
        try:
            doff, dsize, self.bitmaps = parse_bitmaps(f, ext, cluster_bits, size, file_size)
        except ImageFormatError as exc:
            raise ImageFormatError("%s; this program cannot keep the image's persistent "
                                   "bitmaps up to date: open it read-only, or remove the "
                                   "bitmaps with 'qemu-img bitmap --remove'" % exc)
        for bm in self.bitmaps:
            if bm.flags & FLAG_IN_USE:
                raise InconsistentBitmapError(
                    "%s: persistent bitmap %r is marked in use (the program that last "
                    "wrote the image stopped without saving it), so it may miss writes; "
                    "remove it with 'qemu-img bitmap --remove %s %s' (and take a full "
                    "backup), or open the image read-only" % (path, bm.name, path, bm.name),
                    bm.name)
        self.enabled = []
        for bm in self.bitmaps:
            if not bm.flags & FLAG_AUTO:
                continue
            need = ((((size + (1LL << bm.granularity_bits) - 1) >> bm.granularity_bits) + 7)
                    >> 3)
            need = (need + cs - 1) // cs
            if bm.table_size != need:
                raise ImageFormatError(
                    "%s: bitmap %r has a table of %d entries, not the %d its size needs; "
                    "open the image read-only, or remove the bitmap with 'qemu-img bitmap "
                    "--remove'" % (path, bm.name, bm.table_size, need))
            # written in place below: nothing else may share these clusters
            used = list(range(doff // cs, (doff + dsize + cs - 1) // cs))
            used += range(bm.table_offset // cs,
                          (bm.table_offset + bm.table_size * 8 + cs - 1) // cs)
            used += [o // cs for o in bm.data_clusters()]
            for c in used:
                if refcount(c) != 1:
                    raise ImageFormatError(
                        "%s: bitmap %r uses cluster %d whose refcount is %d, not 1; repair "
                        "the image with 'qemu-img check -r all' or open it read-only"
                        % (path, bm.name, c, refcount(c)))
            self.enabled.append(bm)
        self.active = False

    @property
    def tracking(self):
        """True when some bitmap is enabled: guest writes must be recorded."""
        return bool(self.enabled)

    def set_in_use(self, bint on):
        """Write the in_use flag of every enabled bitmap (each one 4-byte field inside a
        sector); the caller syncs."""
        cdef Bitmap bm
        for bm in self.enabled:
            flags = (bm.flags | FLAG_IN_USE) if on else (bm.flags & ~FLAG_IN_USE)
            self.f.pwrite(struct.pack(">I", flags), bm.entry_offset + 12)
        self.active = on

    def mark(self, int64_t vaddr, int64_t n):
        """Set, in every enabled bitmap, the bits of the granules that [vaddr, vaddr + n)
        touches. The in_use flags must be durable first (``set_in_use``)."""
        cdef Bitmap bm
        cdef int64_t b0, b1, per = self.cs * 8, idx, lo, hi, off
        cdef uint64_t e
        cdef bytearray chunk
        cdef unsigned char* p
        if n <= 0 or not self.enabled:
            return
        if vaddr < 0 or vaddr + n > self.size:
            raise ValueError("bitmap range [%d, %d) outside the virtual size" % (vaddr, vaddr + n))
        for bm in self.enabled:
            b0 = vaddr >> bm.granularity_bits
            b1 = (vaddr + n - 1) >> bm.granularity_bits
            for idx in range(b0 // per, b1 // per + 1):
                e = bm.table[idx]
                off = e & TABLE_OFFSET_MASK
                if off == 0 and e & TABLE_ALL_ONES:
                    continue  # every bit already set
                chunk = bm.chunks.get(idx)
                if chunk is None:
                    chunk = bytearray(self.f.pread(off, self.cs)) if off else bytearray(self.cs)
                    bm.chunks[idx] = chunk
                lo = max(b0, idx * per) - idx * per
                hi = min(b1, idx * per + per - 1) - idx * per
                p = <unsigned char*>(<char*>chunk)
                if set_bits(p, lo, hi):
                    bm.dirty.add(idx)

    def write_data(self, alloc, free):
        """Write every changed data cluster: in place, or (where the table said "all
        clean") into a new cluster from ``alloc(1)`` whose table entry is written later by
        ``write_tables``. The caller then makes the data and refcounts durable. A new
        cluster whose write fails (a full disk) is given back with ``free(host, 1)``, so
        that a later flush allocates it again without leaking the first."""
        cdef Bitmap bm
        cdef int64_t host
        for bm in self.enabled:
            for idx in sorted(bm.dirty):
                chunk = bm.chunks[idx]
                off = bm.table[idx] & TABLE_OFFSET_MASK
                if off == 0:
                    host = alloc(1)
                    try:
                        self.f.pwrite(bytes(chunk), host)
                    except BaseException:
                        free(host, 1)
                        raise
                    bm.table[idx] = host
                    bm.pending.add(idx)
                else:
                    self.f.pwrite(bytes(chunk), off)
                bm.dirty.discard(idx)
            bm.chunks.clear()  # memory stays bounded by what changes between flushes

    def write_tables(self):
        """Write the table entries that point at new data clusters (each 8 bytes, inside a
        sector); True when something was written (the caller syncs)."""
        cdef Bitmap bm
        wrote = False
        for bm in self.enabled:
            for idx in sorted(bm.pending):
                self.f.pwrite(struct.pack(">Q", bm.table[idx]), bm.table_offset + 8 * idx)
                wrote = True
            bm.pending.clear()
        return wrote
