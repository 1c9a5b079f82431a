"""Repair on a writable open, as QEMU does it.

QEMU repairs two kinds of image when it opens them read-write, and so does
``blockpull.open`` (before the driver reads any table, under QEMU's write lock):

* qcow2 with incompatible bit 0 ("dirty") set and bit 1 ("corrupt") clear: a writer with
  lazy refcounts (compatible bit 0) stopped without writing its refcounts back (QEMU's
  docs/interop/qcow2.rst, "Header", incompatible and compatible feature bits). The
  refcounts are rebuilt from the tables: every count is set to the references found
  (header, L1/L2 tables, refcount table and blocks, snapshots and their tables, bitmaps'
  directory, tables and data, compressed clusters' sectors, data clusters), COPIED flags
  follow, all made durable (fdatasync) before the dirty bit is cleared (then synced);
* QED with the need-check feature bit (0x02) set: the table entries QEMU's check clears
  (unaligned, inside the header or past the end of the file) are cleared and made
  durable before the bit is cleared (QEMU's docs/interop/qed_spec.txt, "Feature bits").

A crash during a repair leaves the bit set: the next writable open repairs again.
What cannot be repaired this way (a structure that cannot be read, a cluster with two
uses, a refcount block missing) is refused with ``ImageFormatError``. Read-only opens
never repair. blockpull itself never sets either bit (docs/crash-model.md).
"""
from __future__ import annotations

import logging
import struct
from typing import Optional

from blockpull import _qcow2, _qed, _qed_check
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


def _repair_qcow2(f: File, path: str) -> str:
    """Rebuild the refcounts of a dirty qcow2 image open writable and locked as ``f``,
    then clear its dirty bit (see the module docstring)."""
    dirty = "image is marked dirty (refcounts may be stale)"
    drv = _qcow2.Qcow2(f, False)      # read-only parse: the dirty bit is accepted
    chk = walk_qcow2(f, drv)
    if chk.check_errors or chk.skipped:
        raise _refuse(path, dirty, "some metadata could not be read or understood")
    if any(m.startswith("overlap:") for m in chk.messages):
        raise _refuse(path, dirty, "a cluster has two different uses")
    uncovered = chk.uncovered()
    if uncovered:
        raise _refuse(path, dirty, f"cluster {uncovered[0]} is in use but no refcount "
                                   f"block covers it")
    blocks = chk.recounted_blocks()
    rc_max = (1 << (1 << drv.refcount_order)) - 1
    raised = lowered = 0
    fixable = set()
    for _off, _data, changed in blocks:
        for c in changed:
            want, had = chk.expected_count(c), chk.stored_count(c)
            if want > rc_max:
                raise _refuse(path, dirty, f"cluster {c} has {want} references, more "
                                           f"than {1 << drv.refcount_order}-bit refcounts hold")
            if want > had:
                raised += 1
            else:
                lowered += 1
            chk.set_stored(c, want)      # in memory: the flags are judged by the new counts
            if want == 1:
                fixable.add(c)
    # every corruption the walk found must be a count too low, now raised
    fixes = chk.check_flags(fixable)
    if chk.corruptions != raised:
        raise _refuse(path, dirty, f"{chk.corruptions - raised} errors besides stale "
                                   f"refcounts; see 'qemu-img check'")
    for off, data, _changed in blocks:
        f.pwrite(data, off)
    f.fdatasync()
    for off, entry in fixes:
        f.pwrite(struct.pack(">Q", entry), off)
    if fixes:
        f.fdatasync()
    inc, = struct.unpack(">Q", f.pread(QCOW2_INCOMPAT_AT, 8))
    f.pwrite(struct.pack(">Q", inc & ~_qcow2.INCOMPAT_DIRTY), QCOW2_INCOMPAT_AT)
    f.fdatasync()
    return (f"repaired on open (image was left dirty): {raised} refcounts raised, "
            f"{lowered} lowered, {len(fixes)} COPIED flags set; dirty bit cleared")


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
