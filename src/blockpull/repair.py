"""Repair on a writable open, as QEMU does it.

QEMU repairs two kinds of image when it opens them read-write, and so does
``blockpull.open`` (before the driver reads any table, under QEMU's write lock):

* qcow2 with incompatible bit 0 ("dirty") set and bit 1 ("corrupt") clear: a writer with
  lazy refcounts (compatible bit 0) stopped without writing its refcounts back (QEMU's
  docs/interop/qcow2.rst, "Header", incompatible and compatible feature bits). The
  refcounts are rebuilt from the tables: every count is set to the references found
  (header, L1/L2 tables, refcount table and blocks, snapshots and their tables, bitmaps'
  directory, tables and data, compressed clusters' sectors, data clusters), blocks are
  made where none covers a cluster in use (where the refcount table has no room for
  them, the whole refcount structure is rebuilt after the end of the file, as QEMU's
  check does, and the header switched to it in one write), COPIED flags follow the
  new counts (set where a count is 1, cleared where it is more), all made durable
  (fdatasync) before the dirty bit is cleared (then synced);
* QED with the need-check feature bit (0x02) set: the table entries QEMU's check clears
  (unaligned, inside the header or past the end of the file) are cleared and made
  durable before the bit is cleared (QEMU's docs/interop/qed_spec.txt, "Feature bits").

A crash during a repair leaves the bit set: the next writable open repairs again.
What cannot be repaired this way (a structure that cannot be read, a cluster with two
uses, a refcount table entry unaligned or with reserved bits set: QEMU marks those
corrupt) is refused with ``ImageFormatError``, nothing written. Read-only opens never repair. blockpull itself
never sets either bit (docs/crash-model.md).
"""
from __future__ import annotations

import logging
import struct
from typing import Any, Dict, List, Optional, Tuple

from blockpull import _qcow2, _qed, _qed_check
from blockpull._q2header import MAX_REFTABLE_BYTES
from blockpull._fileio import File
from blockpull.checks import walk_qcow2
from blockpull.errors import ImageFormatError
from blockpull.formats import refuse_fifo
from blockpull.locking import lock_image

__all__ = ["needs_repair", "repair_on_open"]

log = logging.getLogger("blockpull")

#: byte offset of qcow2's incompatible_features (v3) and QED's features field
QCOW2_INCOMPAT_AT = 72
QED_FEATURES_AT = 16


def needs_repair(head: bytes, fmt: Optional[str]) -> Optional[str]:
    """The format ("qcow2" or "qed") whose writable open repairs the image whose first
    112 bytes are ``head``, or None: qcow2 v3 dirty and not corrupt, QED with need-check.
    ``fmt``: the format the caller names (None: the magic decides)."""
    if head[:4] == _qcow2.MAGIC and fmt in (None, "qcow2") and len(head) >= 80:
        version, = struct.unpack(">I", head[4:8])
        inc, = struct.unpack(">Q", head[QCOW2_INCOMPAT_AT:QCOW2_INCOMPAT_AT + 8])
        if (version == 3 and inc & _qcow2.INCOMPAT_DIRTY
                and not inc & _qcow2.INCOMPAT_CORRUPT):
            return "qcow2"
    if head[:4] == _qed.MAGIC and fmt in (None, "qed") and len(head) >= 24:
        feat, = struct.unpack("<Q", head[QED_FEATURES_AT:QED_FEATURES_AT + 8])
        if feat & _qed.F_NEED_CHECK:
            return "qed"
    return None


def repair_on_open(path: str, fmt: Optional[str]) -> Optional[str]:
    """Repair the image at ``path`` if QEMU would repair it on a read-write open (see the
    module docstring), under QEMU's write lock; log one INFO line saying what was done
    and return it (None: nothing to repair). ``fmt`` as in ``needs_repair``. Raises
    ImageFormatError for an image that cannot be repaired this way, ImageLockedError when
    another process has it open, OSError when a write or sync fails."""
    refuse_fifo(path)
    try:
        f = File(path, False, "top")
    except OSError:
        return None     # opening it for real says what is wrong
    try:
        kind = needs_repair(f.pread(0, 112), fmt)
    finally:
        f.close()
    if kind is None:
        return None
    f = File(path, True, "top")
    try:
        lock_image(f, True, path)
        # another opener may have repaired it in between
        kind = needs_repair(f.pread(0, 112), fmt)
        if kind is None:
            return None
        what = _repair_qcow2(f, path) if kind == "qcow2" else _repair_qed(f, path)
    finally:
        f.close()
    log.info("%s: %s", path, what)
    return what


def _refuse(path: str, what: str, reason: str) -> ImageFormatError:
    return ImageFormatError(f"{path}: {what} and cannot be repaired on open ({reason}); "
                            f"run 'qemu-img check -r all' on it or open it read-only")


DIRTY = "image is marked dirty (refcounts may be stale)"


def _repair_qcow2(f: File, path: str) -> str:
    """Rebuild the refcounts of a dirty qcow2 image open writable and locked as ``f``,
    then clear its dirty bit (see the module docstring). Nothing is written before the
    whole repair is known to be possible."""
    drv = _qcow2.Qcow2(f, False)      # read-only parse: the dirty bit is accepted
    chk = walk_qcow2(f, drv)
    if chk.check_errors or chk.skipped:
        raise _refuse(path, DIRTY, "some metadata could not be read or understood")
    if any(m.startswith("overlap:") for m in chk.messages):
        raise _refuse(path, DIRTY, "a cluster has two different uses")
    rb: Any
    try:
        rb = _Refblocks(f, path, drv, chk)
    except _Rebuild:
        rb = _Rebuilt(f, path, drv, chk)
    # in memory first: the flags are judged by the new counts
    raised, lowered, low = rb.apply()
    # every other corruption the walk found must be a count too low, now raised;
    # COPIED flags wrong either way are fixed, as QEMU's check_oflag_copied fixes them
    fixes = chk.check_flags(all_flags=True)
    if chk.corruptions != low:
        raise _refuse(path, DIRTY, f"{chk.corruptions - low} errors besides stale "
                                   f"refcounts; see 'qemu-img check'")
    rb.write()
    for off, entry in fixes:
        f.pwrite(struct.pack(">Q", entry), off)
    if fixes:
        f.fdatasync()
    inc, = struct.unpack(">Q", f.pread(QCOW2_INCOMPAT_AT, 8))
    f.pwrite(struct.pack(">Q", inc & ~_qcow2.INCOMPAT_DIRTY), QCOW2_INCOMPAT_AT)
    f.fdatasync()
    cleared = sum(1 for _off, entry in fixes if not entry >> 63)
    return (f"repaired on open (image was left dirty): {raised} refcounts raised, "
            f"{lowered} lowered{rb.made()}, {len(fixes) - cleared} COPIED flags set, "
            f"{cleared} cleared; dirty bit cleared")


def _store(buf: bytearray, order: int, i: int, v: int) -> None:
    """Refcount ``i`` of a refcount block (QEMU's docs/interop/qcow2.rst, "Host cluster
    management": 2**order bits, big-endian, packed from the least significant bit of each
    byte below 8 bits)."""
    bits = 1 << order
    if bits >= 8:
        n = bits // 8
        buf[i * n:(i + 1) * n] = v.to_bytes(n, "big")
    else:
        byte, shift = (i * bits) // 8, (i * bits) % 8
        mask = ((1 << bits) - 1) << shift
        buf[byte] = (buf[byte] & ~mask) | ((v << shift) & mask)


class _Rebuild(Exception):
    """The refcount structure must be rebuilt: its table has no room for a refcount
    block the repair must make, or names a block past the end of the file."""


def _outside(table: List[int], cs: int, size: int) -> int:
    """Refcount table entries naming a block past the end of a file of ``size`` bytes
    (aligned, no reserved bit: ``qemu-img check -r all`` repairs those by a rebuild)."""
    return sum(1 for e in table if e and not e & 0x1FF and not e % cs and e + cs > size)


class _Refblocks:
    """The refcount blocks of a dirty image as the repair leaves them: the blocks whose
    counts change (``Qcow2Check.recounted_blocks``) and, for clusters in use that no block
    covers, new blocks after the end of the file, each counted by itself, another new
    block or an existing one (the refcount table must already have room for them)."""

    def __init__(self, f: File, path: str, drv: Any, chk: Any) -> None:
        self.f, self.chk = f, chk
        self.cs = drv.cluster_size
        self.order = drv.refcount_order
        self.rb_entries = self.cs * 8 >> self.order
        self.rc_max = (1 << (1 << self.order)) - 1
        self.rt_off = drv.rt_offset
        rt = f.pread(self.rt_off, drv.rt_clusters * self.cs)
        self.table = [struct.unpack_from(">Q", rt, 8 * i)[0] for i in range(len(rt) // 8)]
        if _outside(self.table, self.cs, f.size()):
            raise _Rebuild()
        self.nb = (f.size() + self.cs - 1) // self.cs
        # block index -> (offset, bytes) of every block written, and which counts change
        self.blocks: Dict[int, Tuple[int, bytearray]] = {}
        self.changed: List[Tuple[int, int, int]] = []
        for off, data, clusters in chk.recounted_blocks():
            self.blocks[clusters[0] // self.rb_entries] = (off, bytearray(data))
            self.changed += [(c, chk.expected_count(c), chk.stored_count(c)) for c in clusters]
        self.new: Dict[int, int] = {}          # block index -> host cluster of a new block
        uncovered = chk.uncovered()
        if uncovered:
            self._place(sorted({c // self.rb_entries for c in uncovered}), path)
            self.changed += [(c, chk.expected_count(c), 0) for c in uncovered]
        for c, want, _had in self.changed:
            if want > self.rc_max:
                raise _refuse(path, DIRTY, f"cluster {c} has {want} references, more than "
                                           f"{1 << self.order}-bit refcounts hold")

    def apply(self) -> Tuple[int, int, int]:
        """Record the new counts as the stored ones (``Qcow2Check.set_stored``); returns
        (counts raised, counts lowered, counts that were too low)."""
        raised = lowered = 0
        for c, want, had in self.changed:
            raised += want > had
            lowered += want < had
            self.chk.set_stored(c, want)
        return raised, lowered, raised

    def made(self) -> str:
        """What the repair made, for its log line."""
        return f", {len(self.new)} refcount blocks made" if self.new else ""

    def _place(self, missing: List[int], path: str) -> None:
        """New blocks for the block indexes in ``missing``, after the end of the file."""
        nxt = self.nb
        queue = list(missing)
        while queue:
            idx = queue.pop(0)
            if idx >= len(self.table):
                raise _Rebuild()
            b, nxt = nxt, nxt + 1
            self.new[idx] = b
            self.blocks[idx] = (b * self.cs, bytearray(self.cs))
            for c in range(idx * self.rb_entries, min((idx + 1) * self.rb_entries, self.nb)):
                n = self.chk.expected_count(c)
                if n:
                    _store(self.blocks[idx][1], self.order, c % self.rb_entries, n)
            j = b // self.rb_entries           # the block that counts this one
            if j in self.new or j in queue:
                continue
            if j < len(self.table) and self.table[j]:
                self._existing(j, path)
            else:
                queue.append(j)
        for b in self.new.values():         # each new block counted once
            _store(self.blocks[b // self.rb_entries][1], self.order, b % self.rb_entries, 1)

    def _existing(self, j: int, path: str) -> None:
        """Make existing block ``j`` one of the blocks written (it counts a new block)."""
        off = self.table[j]
        if off % self.cs or off + self.cs > self.nb * self.cs:
            raise _refuse(path, DIRTY, f"refcount block {j} at 0x{off:x} is invalid")
        if j not in self.blocks:
            self.blocks[j] = (off, bytearray(self.f.pread(off, self.cs)))

    def write(self) -> None:
        """Write the blocks, sync, then the table entries naming new blocks, sync: a
        table entry never names a block that is not on disk."""
        for off, data in self.blocks.values():
            self.f.pwrite(bytes(data), off)
        self.f.fdatasync()
        for idx, b in sorted(self.new.items()):
            self.f.pwrite(struct.pack(">Q", b * self.cs), self.rt_off + 8 * idx)
        if self.new:
            self.f.fdatasync()


class _Rebuilt:
    """A whole new refcount structure after the end of the file, for a dirty image whose
    refcount table has no room for the blocks to make or names one past the end of the
    file (QEMU's check rebuilds it so): a block for every range of clusters in use, then
    a table naming them, each cluster of it counted once; the old table and blocks
    become free. ``write`` makes it durable before the header names it
    (refcount_table_offset and refcount_table_clusters, bytes 48 to 59 of the header,
    QEMU's docs/interop/qcow2.rst, "Header": one sector, one write)."""

    def __init__(self, f: File, path: str, drv: Any, chk: Any) -> None:
        self.f, self.chk, self.path = f, chk, path
        cs = self.cs = drv.cluster_size
        entries = cs * 8 >> drv.refcount_order
        self.rc_max = (1 << (1 << drv.refcount_order)) - 1
        nb = self.start = (f.size() + cs - 1) // cs
        in_use = chk.rebuild_in_use()
        nblocks, ntable = len(in_use), 1
        while True:     # the new blocks and table must count themselves too
            self.end = nb + nblocks + ntable
            self.idxs = sorted(set(in_use) | set(range(nb // entries,
                                                       (self.end - 1) // entries + 1)))
            need = max(ntable, -(-8 * (self.idxs[-1] + 1) // cs))
            if len(self.idxs) <= nblocks and need == ntable:
                break
            nblocks, ntable = max(nblocks, len(self.idxs)), need
        if ntable * cs > MAX_REFTABLE_BYTES:
            raise _refuse(path, DIRTY, f"its refcount table would exceed "
                                       f"{MAX_REFTABLE_BYTES} bytes")
        self.nblocks, self.ntable = nblocks, ntable
        self.table_off = (nb + nblocks) * cs
        self.blocks: List[Tuple[int, bytes]] = []
        rt = f.pread(drv.rt_offset, drv.rt_clusters * cs)
        # each counted as a corruption by the walk; the new table names none of them
        self.outside = _outside([struct.unpack_from(">Q", rt, 8 * i)[0]
                                 for i in range(len(rt) // 8)], cs, f.size())

    def apply(self) -> Tuple[int, int, int]:
        """Build the blocks and the table in memory, the new counts recorded as the
        stored ones; returns (counts raised, counts lowered, errors fixed: counts that
        were too low and table entries past the end of the file).
        Raises ImageFormatError for a count the refcount width cannot hold."""
        raised = lowered = low = 0
        table = bytearray(self.ntable * self.cs)
        for k, idx in enumerate(self.idxs):
            data, r, lo, too_low, top = self.chk.rebuilt_block(idx, self.start, self.end)
            if top > self.rc_max:
                raise _refuse(self.path, DIRTY, f"a cluster has {top} references, more "
                                                f"than its refcount width holds")
            off = (self.start + k) * self.cs
            self.blocks.append((off, data))
            struct.pack_into(">Q", table, 8 * idx, off)
            raised, lowered, low = raised + r, lowered + lo, low + too_low
        self.blocks.append((self.table_off, bytes(table)))
        return raised, lowered, low + self.outside

    def made(self) -> str:
        """What the repair made, for its log line."""
        return (f", refcount structure rebuilt ({self.nblocks} blocks, a "
                f"{self.ntable}-cluster table at 0x{self.table_off:x})")

    def write(self) -> None:
        """Blocks and table, sync; then the header names them, sync."""
        for off, data in self.blocks:
            self.f.pwrite(data, off)
        self.f.fdatasync()
        self.f.pwrite(struct.pack(">QI", self.table_off, self.ntable), 48)
        self.f.fdatasync()


def _repair_qed(f: File, path: str) -> str:
    """Clear the invalid table entries of a QED image with the need-check bit set, open
    writable and locked as ``f``, then clear the bit (see the module docstring)."""
    cleared, chk = _qed_check.repair_qed(f)
    if chk.corruptions:
        raise _refuse(path, "the need-check feature bit is set (QEMU did not close it "
                      "cleanly)", f"{chk.corruptions} clusters referenced twice")
    feat, = struct.unpack("<Q", f.pread(QED_FEATURES_AT, 8))
    f.pwrite(struct.pack("<Q", feat & ~_qed.F_NEED_CHECK), QED_FEATURES_AT)
    f.fdatasync()
    return (f"repaired on open (need-check bit was set): {cleared} invalid table entries "
            f"cleared; need-check bit cleared")
