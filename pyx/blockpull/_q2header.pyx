# cython: language_level=3
"""The qcow2 header: parsed once, checked against the file, and rewritten crash-safely.

``Header.read`` parses the fixed fields, the feature bits, the header extensions, the
backing file name and format, and the snapshot table (QEMU's docs/interop/qcow2.rst,
"Header", "Header extensions", "Snapshots"). The driver (blockpull._qcow2), ``create``
and the checker use this one parse. Header writes live here too: the autoclear field,
the switch to a grown refcount table, and the backing link (``set_backing``).
"""
import os
import struct

from blockpull.errors import ImageFormatError
from blockpull._fileio cimport File

MAGIC = b"QFI\xfb"
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1
INCOMPAT_CORRUPT = 2
INCOMPAT_DATA_FILE = 4
INCOMPAT_COMPRESSION = 8
INCOMPAT_EXTL2 = 16
KNOWN_INCOMPAT = 0x1F
#: autoclear bit 1: the external data file is itself a raw image of the guest
AUTOCLEAR_DATA_RAW = 2

#: the largest L1 table QEMU accepts (QCOW_MAX_L1_SIZE), in bytes
MAX_L1_BYTES = 32 * 1024 * 1024
#: the largest refcount table this driver makes or reads, in bytes
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_VIRTUAL_SIZE = 1 << 61
#: the largest snapshot table QEMU accepts (QCOW_MAX_SNAPSHOTS_SIZE), in bytes
MAX_SNAPSHOTS_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024

FEATURE_NAMES = [
    (0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
    (0, 3, b"compression type"), (0, 4, b"extended L2 entries"),
    (1, 0, b"lazy refcounts"), (2, 0, b"bitmaps"), (2, 1, b"raw external data"),
]


def _fmt_err(path, msg):
    return ImageFormatError("%s: %s" % (path, msg))


def probe(bytes head):
    """Whether ``head`` (the first bytes of a file) starts with the qcow2 magic."""
    return head[:4] == MAGIC


def parse_snapshot_table(File f, unsigned long long offset, unsigned long long count,
                         int cluster_bits, long long file_size):
    """The snapshot table: ``([(l1_offset, l1_size, id, name, entry_offset)...], nbytes)``.

    Every length is checked against the file before it is read: the table must lie inside
    the file and within QEMU's limits (65536 snapshots, 64 MiB, 1 KiB of extra data per
    entry). Raises ImageFormatError naming the file and the field; the L1 fields are
    returned as stored (the caller decides whether a bad one is fatal).
    """
    cs = 1 << cluster_bits
    path = f.path
    out = []
    if count == 0:
        return out, 0
    if count > MAX_SNAPSHOTS:
        raise _fmt_err(path, "nb_snapshots %d exceeds %d" % (count, MAX_SNAPSHOTS))
    if offset == 0 or offset & (cs - 1) or offset >= <unsigned long long>file_size:
        raise _fmt_err(path, "snapshots_offset 0x%x invalid (unaligned, zero or past "
                       "the end of the file)" % offset)
    pos = offset
    for i in range(count):
        if pos + 40 > file_size:
            raise _fmt_err(path, "snapshot table entry %d lies past the end of the file" % i)
        (l1_off, l1_size, id_len, name_len, _ds, _dn, _vmc, _vms,
         extra) = struct.unpack(">QIHHIIQII", f.pread(pos, 40))
        if extra > MAX_SNAPSHOT_EXTRA:
            raise _fmt_err(path, "snapshot %d extra_data_size %d exceeds %d"
                           % (i, extra, MAX_SNAPSHOT_EXTRA))
        total = 40 + extra + id_len + name_len
        if pos + total > file_size:
            raise _fmt_err(path, "snapshot table entry %d lies past the end of the file" % i)
        if pos + total - offset > MAX_SNAPSHOTS_BYTES:
            raise _fmt_err(path, "snapshot table larger than %d bytes" % MAX_SNAPSHOTS_BYTES)
        names = f.pread(pos + 40 + extra, id_len + name_len)
        sid = names[:id_len].decode("utf-8", "replace")
        sname = names[id_len:].decode("utf-8", "replace")
        out.append((l1_off, l1_size, sid, sname, pos))
        pos += (total + 7) & ~7
    return out, pos - offset


class Header:
    """One qcow2 header as read from a file (``Header.read``). Sizes and offsets are in
    bytes; ``snapshots`` is ``parse_snapshot_table``'s list; ``extensions`` a list of
    ``(type, data, offset)``."""

    @classmethod
    def read(cls, File f, long long file_size, bint writable, bint metadata_only):
        """Parse and check the header of ``f`` (``file_size`` bytes long). Raises
        ImageFormatError for a malformed or unsupported header; ``writable`` refuses
        images marked dirty or corrupt and extended L2 entries; ``metadata_only`` allows
        encrypted images (their tables are not encrypted)."""
        h = cls()
        h.path = f.path
        h.file_size = file_size
        h.metadata_only = metadata_only
        if file_size < 72:
            raise _fmt_err(f.path, "file is too short for a qcow2 header (%d bytes)" % file_size)
        raw = f.pread(0, 112 if file_size >= 112 else 72)
        if raw[:4] != MAGIC:
            raise _fmt_err(f.path, "not a qcow2 image (bad magic)")
        h._fixed(raw)
        h._features(writable)
        h._tables()
        h._snapshots(f)
        h._extensions(f.pread(0, h.cluster_size))  # zeros past the end of a short file
        h._data_file_rules()
        return h

    def _data_file_rules(self):
        """An image with an external data file names it, has no internal snapshots and
        no compressed clusters (QEMU's docs/interop/qcow2.rst, "Header", incompatible
        bit 2, and "Header extensions", type 0x44415441)."""
        if not self.data_file:
            return
        if not self.data_file_name:
            raise _fmt_err(self.path, "incompatible bit 2 (external data file) is set but no "
                           "data file name is recorded; recreate the link with 'qemu-img "
                           "amend -o data_file=NAME'")
        if self.nb_snapshots:
            raise _fmt_err(self.path, "internal snapshots in an image with an external data "
                           "file (not allowed by the qcow2 format); remove them with "
                           "'qemu-img snapshot -d'")

    def _fixed(self, raw):
        path = self.path
        (version, self.backing_offset, bfs, cbits, size, crypt, self.l1_size,
         self.l1_offset, self.rt_offset, self.rt_clusters, self.nb_snapshots,
         self.snapshots_offset) = struct.unpack(">IQIIQIIQQIIQ", raw[4:72])
        if version not in (2, 3):
            raise _fmt_err(path, "unsupported qcow2 version %d (only 2 and 3)" % version)
        self.version = version
        if not 9 <= cbits <= 21:
            raise _fmt_err(path, "cluster_bits %d out of range 9..21" % cbits)
        self.cluster_bits = cbits
        self.cluster_size = 1 << cbits
        if crypt != 0 and not (self.metadata_only and crypt in (1, 2)):
            raise _fmt_err(path, "encrypted images (crypt_method %d) are not supported" % crypt)
        self.crypt_method = crypt
        if size > MAX_VIRTUAL_SIZE:
            raise _fmt_err(path, "virtual size %d is too large" % size)
        self.size = size
        self.backing_size = bfs if self.backing_offset else 0
        self.compression_type = 0
        if version == 3:
            if self.file_size < 104:
                raise _fmt_err(path, "file is too short for a qcow2 v3 header")
            (self.incompatible, self.compatible, self.autoclear, rorder,
             hlen) = struct.unpack(">QQQII", raw[72:104])
            if hlen < 104 or hlen % 8 or hlen > self.cluster_size:
                raise _fmt_err(path, "header_length %d invalid" % hlen)
            if not 0 <= rorder <= 6:
                raise _fmt_err(path, "refcount_order %d out of range 0..6" % rorder)
            self.header_length = hlen
            self.refcount_order = rorder
            if hlen > 104:
                self.compression_type = raw[104] if len(raw) > 104 else 0
        else:
            self.incompatible = self.compatible = self.autoclear = 0
            self.refcount_order = 4
            self.header_length = 72

    def _features(self, bint writable):
        path = self.path
        unknown = self.incompatible & ~KNOWN_INCOMPAT
        if unknown:
            raise _fmt_err(path, "unknown incompatible feature bits 0x%x; this image needs a newer tool" % unknown)
        # guest clusters live in an external data file at their guest offset (QEMU's
        # docs/interop/qcow2.rst, "Header", incompatible bit 2; autoclear bit 1 says the
        # data file is a raw image of the guest as well)
        self.data_file = bool(self.incompatible & INCOMPAT_DATA_FILE)
        self.data_file_raw = self.data_file and bool(self.autoclear & AUTOCLEAR_DATA_RAW)
        self.extended_l2 = bool(self.incompatible & INCOMPAT_EXTL2)
        if self.extended_l2:
            if self.cluster_bits < 14:
                raise _fmt_err(path, "extended L2 entries need clusters of at least 16 KiB "
                               "(cluster_bits %d)" % self.cluster_bits)
        if self.incompatible & INCOMPAT_COMPRESSION:
            if self.compression_type not in (0, 1):
                raise _fmt_err(path, "unknown compression type %d" % self.compression_type)
        elif self.compression_type != 0:
            raise _fmt_err(path, "compression type %d set without incompatible bit 3" % self.compression_type)
        if writable and self.incompatible & INCOMPAT_CORRUPT:
            raise _fmt_err(path, "image is marked corrupt; repair it (qemu-img check -r all) "
                           "or open it read-only")
        if writable and self.incompatible & INCOMPAT_DIRTY:
            raise _fmt_err(path, "image is marked dirty (refcounts may be stale); run "
                           "'qemu-img check -r all' on it or open it read-only")
        self.l2_bits = self.cluster_bits - 4 if self.extended_l2 else self.cluster_bits - 3

    def _tables(self):
        """The L1 and refcount tables lie, aligned, inside the file and within limits."""
        path, cs, fsize = self.path, self.cluster_size, self.file_size
        l1_off, l1_size = self.l1_offset, self.l1_size
        span = self.cluster_bits + self.l2_bits
        need_l1 = (self.size + (1 << span) - 1) >> span
        if l1_size * 8 > MAX_L1_BYTES:
            raise _fmt_err(path, "L1 table of %d entries is too large" % l1_size)
        if l1_size < need_l1:
            raise _fmt_err(path, "L1 table (%d entries) too small for virtual size %d" % (l1_size, self.size))
        if l1_size and (l1_off % cs or l1_off == 0):
            raise _fmt_err(path, "L1 table offset 0x%x is not cluster aligned" % l1_off)
        if l1_off + l1_size * 8 > fsize and (l1_size or l1_off >= 1 << 62):
            raise _fmt_err(path, "L1 table at 0x%x lies past the end of the file" % l1_off)
        rt_off, rt_cl = self.rt_offset, self.rt_clusters
        if rt_cl == 0 or rt_cl * cs > MAX_REFTABLE_BYTES:
            raise _fmt_err(path, "refcount table size %d clusters invalid" % rt_cl)
        if rt_off % cs or rt_off == 0:
            raise _fmt_err(path, "refcount table offset 0x%x is not cluster aligned" % rt_off)
        if rt_off + rt_cl * cs > fsize:
            raise _fmt_err(path, "refcount table at 0x%x lies past the end of the file" % rt_off)

    def _snapshots(self, File f):
        """Parse the snapshot table once; every snapshot's L1 table must be aligned,
        inside the file and of sane size (together no larger than the file, so that
        memory for them stays bounded by it)."""
        path, cs, fsize = self.path, self.cluster_size, self.file_size
        nb, off = self.nb_snapshots, self.snapshots_offset
        self.snapshots = []
        if not nb:
            if off >= 1 << 62:
                raise _fmt_err(path, "snapshots_offset 0x%x invalid" % off)
            return
        if nb > 65536:
            raise _fmt_err(path, "too many snapshots (nb_snapshots %d)" % nb)
        if off % cs or off == 0 or off >= fsize:
            raise _fmt_err(path, "snapshot table offset 0x%x invalid" % off)
        snaps, _n = parse_snapshot_table(f, off, nb, self.cluster_bits, fsize)
        total = 0
        for (l1_off, l1_size, sid, _name, _pos) in snaps:
            total += l1_size * 8
            if total > fsize:
                raise _fmt_err(path, "snapshot L1 tables (l1_size of snapshot %s and before) "
                               "add up to more than the file size" % sid)
            if l1_size * 8 > MAX_L1_BYTES:
                raise _fmt_err(path, "snapshot %s: l1_size %d too large" % (sid, l1_size))
            if l1_off % cs or (l1_size and (l1_off == 0 or l1_off + l1_size * 8 > fsize)):
                raise _fmt_err(path, "snapshot %s: L1 table offset 0x%x invalid" % (sid, l1_off))
        self.snapshots = snaps

    def _extensions(self, cluster0):
        """Header extensions up to the end marker, and the backing file name."""
        path, cs, bfo, bfs = self.path, self.cluster_size, self.backing_offset, self.backing_size
        self.extensions = []
        self.backing_format = None
        self.crypto_header = None
        self.data_file_name = None
        off = self.header_length
        end = bfo if (bfo and bfo < cs) else cs
        while off + 8 <= end:     # no end marker before the name/cluster end: tolerated
            etype, elen = struct.unpack(">II", cluster0[off:off + 8])
            if etype == EXT_END:
                break
            if off + 8 + elen > end:
                raise _fmt_err(path, "header extension 0x%x overruns the header cluster" % etype)
            data = cluster0[off + 8:off + 8 + elen]
            if etype == EXT_BACKING_FORMAT:
                try:
                    self.backing_format = data.decode("ascii")
                except UnicodeDecodeError:
                    raise _fmt_err(path, "backing format name is not ASCII")
            elif etype == EXT_CRYPTO:
                if not self.metadata_only:
                    raise _fmt_err(path, "encryption header extension present: encrypted "
                                   "images are not supported")
                if len(data) < 16:
                    raise _fmt_err(path, "encryption header extension is too short")
                self.crypto_header = struct.unpack(">QQ", data[:16])
            elif etype == EXT_DATA_FILE:
                # the name as stored (no NUL terminator); judged where it is opened
                self.data_file_name = data.decode("utf-8", "surrogateescape")
            self.extensions.append((etype, data, off))
            off += 8 + ((elen + 7) & ~7)
        self.backing_name = None
        if bfo:
            # where the name lies is the format's business; what it says (empty, NUL,
            # over 1023 bytes, a protocol) is judged where the chain is resolved
            if bfo + bfs > cs or bfo < 72:
                raise _fmt_err(path, "backing_file_offset 0x%x: name lies outside the header "
                               "cluster" % bfo)
            raw = cluster0[bfo:bfo + bfs]
            if len(raw) != bfs:
                raise _fmt_err(path, "backing file name lies past the end of the file")
            self.backing_name = raw.decode("utf-8", "surrogateescape")

    # ---- header writes ------------------------------------------------------------------

    def write_autoclear(self, File f, unsigned long long bits):
        """Write the autoclear feature field (v3, bytes 88..95); the caller syncs."""
        self.autoclear = bits
        f.pwrite(struct.pack(">Q", bits), 88)

    def write_compression_type(self, File f, int ctype):
        """Set the compression type (v3, byte 104; 0 zlib, 1 zstd) and incompatible bit 3
        with it (set for zstd, clear for zlib) in one write of the first sector (QEMU's
        docs/interop/qcow2.rst, "compression type" header field). Only for an image that
        holds no compressed cluster, and with a header of at least 112 bytes; the caller
        syncs before it links a cluster of that type. Raises ValueError otherwise."""
        if self.version != 3 or self.header_length < 112 or ctype not in (0, 1):
            raise ValueError("%s: compression type %d needs a qcow2 v3 header of at least "
                             "112 bytes" % (self.path, ctype))
        raw = bytearray(f.pread(72, 40))
        incompat = struct.unpack(">Q", raw[:8])[0]
        incompat = (incompat | INCOMPAT_COMPRESSION) if ctype else (incompat & ~INCOMPAT_COMPRESSION)
        raw[:8] = struct.pack(">Q", incompat)
        raw[32] = ctype
        f.pwrite(bytes(raw), 72)
        self.incompatible = incompat
        self.compression_type = ctype

    def write_reftable(self, File f, long long offset, long long clusters):
        """Point the header at a refcount table (bytes 48..59: offset, clusters) in one
        write of the first sector; the caller syncs."""
        self.rt_offset = offset
        self.rt_clusters = clusters
        f.pwrite(struct.pack(">QI", offset, clusters), 48)

    def set_backing(self, File f, name, fmt, sync):
        """Point the image at backing ``name`` of format ``fmt`` (or at none)
        crash-safely: the new name goes where the old one is not, is made durable
        (``sync()``), and only then does one write of the first sector switch the link.
        Raises ValueError for a name that is empty, over 1023 bytes, holds a NUL or does
        not fit in the header cluster."""
        cs = self.cluster_size
        cluster0 = bytearray(f.pread(0, cs))
        fmt_ext = None
        ext_end = self.header_length
        for (etype, data, off) in self.extensions:
            if etype == EXT_BACKING_FORMAT:
                fmt_ext = (off, len(data))
            ext_end = max(ext_end, off + 8 + ((len(data) + 7) & ~7))
        ext_end += 8  # end marker
        if name is None:
            sector0 = bytearray(cluster0[:512])
            sector0[8:20] = b"\0" * 12
            f.pwrite(bytes(sector0), 0)
            sync()
            self.backing_name = None
            self.backing_offset = 0
            self.backing_size = 0
            return
        bname = name.encode("utf-8", "surrogateescape")
        if not bname or len(bname) > 1023 or b"\0" in bname:
            raise ValueError("backing name must be 1..1023 bytes without NUL")
        fmtb = fmt.encode("ascii") if fmt else None
        in_place = (fmtb is not None and fmt_ext is not None and
                    ((len(fmtb) + 7) & ~7) == ((fmt_ext[1] + 7) & ~7) and
                    fmt_ext[0] + 8 + len(fmtb) <= 512)
        if not in_place:
            return self._rewrite(f, cluster0, bname, fmtb, sync)
        # place the new name after the extensions and clear of the old name
        old_lo = self.backing_offset
        old_hi = old_lo + self.backing_size if old_lo else 0
        pos = (max(ext_end, old_hi) + 7) & ~7
        if pos + len(bname) > cs:
            pos = (ext_end + 7) & ~7
            if old_lo and pos + len(bname) > old_lo:
                return self._rewrite(f, cluster0, bname, fmtb, sync)
        f.pwrite(bname, pos)
        sync()
        sector0 = bytearray(f.pread(0, 512))
        sector0[8:20] = struct.pack(">QI", pos, len(bname))
        fo = fmt_ext[0]
        padded = (len(fmtb) + 7) & ~7
        sector0[fo:fo + 8] = struct.pack(">II", EXT_BACKING_FORMAT, len(fmtb))
        sector0[fo + 8:fo + 8 + padded] = fmtb.ljust(padded, b"\0")
        f.pwrite(bytes(sector0), 0)
        sync()
        self.backing_name = name
        self.backing_format = fmt
        self.backing_offset = pos
        self.backing_size = len(bname)
        self.extensions = [(t, (fmtb if t == EXT_BACKING_FORMAT else d), o)
                           for (t, d, o) in self.extensions]

    def _rewrite(self, File f, cluster0, bytes bname, fmtb, sync):
        """General case: lay out the header cluster anew (extensions kept, backing format
        replaced), written name first and header last."""
        exts = bytearray()
        if fmtb is not None:
            exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fmtb)) + fmtb.ljust((len(fmtb) + 7) & ~7, b"\0")
        for (etype, data, off) in self.extensions:
            if etype != EXT_BACKING_FORMAT:
                exts += struct.pack(">II", etype, len(data)) + bytes(data).ljust((len(data) + 7) & ~7, b"\0")
        exts += b"\0" * 8
        newc = bytearray(cluster0[:self.header_length]) + exts
        name_off = len(newc)
        if name_off + len(bname) > self.cluster_size:
            raise ValueError("backing name does not fit in the header cluster")
        newc += bname
        newc[8:20] = struct.pack(">QI", name_off, len(bname))
        # tail first (beyond the first sector), then the first sector
        if len(newc) > 512:
            f.pwrite(bytes(newc[512:]), 512)
            sync()
        f.pwrite(bytes(newc[:512]), 0)
        sync()
        self.backing_name = bname.decode("utf-8", "surrogateescape")
        self.backing_format = fmtb.decode("ascii") if fmtb is not None else None
        self.backing_offset = name_off
        self.backing_size = len(bname)
        self.extensions = []
        off = self.header_length
        while off + 8 <= name_off:
            etype, elen = struct.unpack(">II", newc[off:off + 8])
            if etype == EXT_END:
                break
            self.extensions.append((etype, bytes(newc[off + 8:off + 8 + elen]), off))
            off += 8 + ((elen + 7) & ~7)


def _layout(long long size, long long cs):
    """Where ``create`` puts its tables: (l1_size, l1_clusters, rt_clusters, n_rb); the
    refcount blocks (16-bit counts) cover every cluster the image starts with."""
    l2_entries = cs // 8
    l1_size = (size + cs * l2_entries - 1) // (cs * l2_entries)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ValueError("size too large for this cluster size")
    l1_clusters = max(1, (l1_size * 8 + cs - 1) // cs)
    rb_entries = cs * 8 // 16
    rt_clusters = 1
    n_rb = 1
    while True:
        total = 1 + rt_clusters + n_rb + l1_clusters
        need_rb = (total + rb_entries - 1) // rb_entries
        need_rt = (need_rb * 8 + cs - 1) // cs
        if need_rb <= n_rb and need_rt <= rt_clusters:
            return l1_size, l1_clusters, rt_clusters, n_rb
        n_rb = max(n_rb, need_rb)
        rt_clusters = max(rt_clusters, need_rt)


def _extensions_for(version, hlen, cs, bname, backing_format):
    """The header extensions ``create`` writes, end marker included."""
    exts = bytearray()
    if bname is not None and backing_format is not None:
        fb = backing_format.encode("ascii")
        exts += struct.pack(">II", EXT_BACKING_FORMAT, len(fb)) + fb.ljust((len(fb) + 7) & ~7, b"\0")
    if version == 3:
        table = b"".join(struct.pack(">BB46s", t, b, name) for (t, b, name) in FEATURE_NAMES)
        if hlen + len(exts) + 8 + len(table) + 8 + (len(bname) if bname else 0) <= min(cs, 4096):
            exts += struct.pack(">II", EXT_FEATURE_TABLE, len(table)) + table
    exts += b"\0" * 8
    return exts


def create(path, long long size, long long cluster_size=65536, str compat="1.1",
           backing=None, backing_format=None):
    """Write a new, empty qcow2 image of ``size`` bytes (rounded up to 512) at ``path``:
    v3 for compat "1.1", v2 for "0.10"; ``cluster_size`` a power of two, 512..2 MiB.
    Raises ValueError for an argument out of range or a backing name that does not fit."""
    if cluster_size < 512 or cluster_size > (1 << 21) or cluster_size & (cluster_size - 1):
        raise ValueError("cluster_size must be a power of two from 512 to 2M")
    if compat not in ("1.1", "0.10", "v3", "v2"):
        raise ValueError("compat must be '1.1' (qcow2 v3) or '0.10' (qcow2 v2)")
    version = 3 if compat in ("1.1", "v3") else 2
    if size < 0 or size > MAX_VIRTUAL_SIZE:
        raise ValueError("size out of range")
    size = (size + 511) & ~511
    cs = cluster_size
    l1_size, l1_clusters, rt_clusters, n_rb = _layout(size, cs)
    rt_off = cs
    rb_off = rt_off + rt_clusters * cs
    l1_off = rb_off + n_rb * cs
    total = 1 + rt_clusters + n_rb + l1_clusters
    hlen = 112 if version == 3 else 72
    bname = None
    if backing is not None:
        bname = os.fsencode(backing)
        if not bname or len(bname) > 1023 or b"\0" in bname:
            raise ValueError("backing name must be 1..1023 bytes without NUL")
    exts = _extensions_for(version, hlen, cs, bname, backing_format)
    name_off = hlen + len(exts)
    if bname is not None and name_off + len(bname) > cs:
        raise ValueError("backing name does not fit in a %d-byte header cluster" % cs)
    hdr = bytearray(cs)
    struct.pack_into(">4sIQIIQIIQQIIQ", hdr, 0, MAGIC, version,
                     name_off if bname else 0, len(bname) if bname else 0,
                     cs.bit_length() - 1, size, 0, l1_size, l1_off, rt_off, rt_clusters, 0, 0)
    if version == 3:
        struct.pack_into(">QQQII", hdr, 72, 0, 0, 0, 4, hlen)
    hdr[hlen:hlen + len(exts)] = exts
    if bname:
        hdr[name_off:name_off + len(bname)] = bname
    rt = bytearray(rt_clusters * cs)
    for i in range(n_rb):
        struct.pack_into(">Q", rt, 8 * i, rb_off + i * cs)
    rbs = bytearray(n_rb * cs)
    for c in range(total):
        struct.pack_into(">H", rbs, 2 * c, 1)
    f = File(path, True, "top", True)
    try:
        f.pwrite(hdr, 0)
        f.pwrite(rt, rt_off)
        f.pwrite(rbs, rb_off)
        f.truncate(total * cs)
        f.fdatasync()
    finally:
        f.close()
