"""The metadata check of each format, as ``qemu-img check`` counts it, and its result.

``blockpull.check`` (checker.py) opens and locks the image and calls the check its format
entry names (formats.py): ``check(file, path, repair) -> CheckResult``.
"""
from __future__ import annotations

import struct
from typing import Any, Dict, List, NamedTuple, Set, Tuple

from blockpull import _qcow2, _qed_check
from blockpull._bitmaps import AUTOCLEAR_BITMAPS, parse_bitmaps
from blockpull._check import Qcow2Check, parse_snapshot_table
from blockpull._fileio import File
from blockpull.errors import ImageFormatError

__all__ = ["CheckResult", "check_qcow2", "check_qed", "walk_qcow2"]


class CheckResult(NamedTuple):
    """What a check found, counted the way ``qemu-img check`` counts it.

    ``corruptions``: clusters referenced more often than their refcount says (or with a
    wrong COPIED flag, an unaligned offset, an offset past the end of the file...): writing
    to the image could lose data. ``leaks``: clusters whose refcount is higher than their
    references: wasted space, harmless. ``check_errors``: parts that could not be checked
    (I/O errors). ``image_end_offset``: end of the last cluster in use. ``messages``: one
    line per finding (at most 1000; ``dropped_messages`` counts the rest).
    ``leaks_fixed``: leaks a ``repair=True`` check removed (``leaks`` counts those left).
    ``fragmented_clusters``: data clusters of the active tables that do not follow the one
    before them in the same L2 table in the file (compressed ones always), as
    ``qemu-img check`` counts them.
    """
    corruptions: int
    leaks: int
    check_errors: int
    image_end_offset: int
    messages: Tuple[str, ...]
    path: str = ""
    format: str = ""
    total_clusters: int = 0
    allocated_clusters: int = 0
    compressed_clusters: int = 0
    leaks_fixed: int = 0
    dropped_messages: int = 0
    fragmented_clusters: int = 0

    @property
    def clean(self) -> bool:
        """No corruption, no leak, nothing left unchecked."""
        return not (self.corruptions or self.leaks or self.check_errors)

    @property
    def exit_code(self) -> int:
        """``qemu-img check``'s exit code: 0 clean, 1 check errors, 2 corrupt, 3 leaks only."""
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> Dict[str, Any]:
        """The fields ``qemu-img check --output=json`` prints, with its key names; as
        there, counts that are 0 are left out, and QED images have no image end offset."""
        d: Dict[str, Any] = {
            "filename": self.path, "format": self.format,
            "check-errors": self.check_errors,
        }
        if self.image_end_offset and self.format != "qed":
            d["image-end-offset"] = self.image_end_offset
        for key, n in (("total-clusters", self.total_clusters),
                       ("allocated-clusters", self.allocated_clusters),
                       ("fragmented-clusters", self.fragmented_clusters),
                       ("compressed-clusters", self.compressed_clusters)):
            if n:
                d[key] = n
        if self.corruptions:
            d["corruptions"] = self.corruptions
        if self.leaks:
            d["leaks"] = self.leaks
        if self.leaks_fixed:
            d["leaks-fixed"] = self.leaks_fixed
        return d


def check_qcow2(f: File, path: str, repair: bool) -> CheckResult:
    """Check the qcow2 image open (writable if ``repair``) and locked as ``f``: walk every
    structure that owns clusters (``Qcow2Check``) and, with ``repair``, lower leaked
    refcounts (``_repair_leaks``) and set COPIED where a count dropped to one.
    Raises ImageFormatError when the header is unusable."""
    # validates the header and the table extents; encrypted images are checked too
    drv = _qcow2.Qcow2(f, False, metadata_only=True)
    cbits = drv.cluster_bits
    chk = walk_qcow2(f, drv)
    fixed = 0
    fixable: Set[int] = set()
    if repair and chk.leaks:
        if drv.incompatible & _qcow2.INCOMPAT_CORRUPT:
            chk.messages.append("image is marked corrupt: leaks not repaired "
                                "(repair the corruption with qemu-img check -r all)")
        elif chk.check_errors or chk.skipped:
            # a structure that was not read, not understood or not walkable may own
            # clusters that look leaked: freeing them could destroy it
            chk.messages.append("check incomplete: leaks not repaired (some metadata "
                                "could not be read or understood; see the errors above)")
        else:
            fixed, fixable = _repair_leaks(f, chk)
    fixes = chk.check_flags(fixable)
    if fixes:
        # the refcounts these entries rely on are durable: COPIED may now say so
        for off, entry in fixes:
            f.pwrite(struct.pack(">Q", entry), off)
        f.fdatasync()
        chk.messages.append("Repaired %d COPIED flags of clusters whose leaks were fixed"
                            % len(fixes))
    cs = 1 << cbits
    return CheckResult(
        corruptions=chk.corruptions, leaks=chk.leaks - fixed,
        check_errors=chk.check_errors,
        image_end_offset=(chk.highest + 1) * cs,
        messages=tuple(chk.messages), path=path, format="qcow2",
        total_clusters=(drv.size + cs - 1) // cs,
        allocated_clusters=chk.allocated_clusters,
        compressed_clusters=chk.compressed_clusters,
        leaks_fixed=fixed, dropped_messages=chk.dropped_messages,
        fragmented_clusters=chk.fragmented_clusters)


def walk_qcow2(f: File, drv: Any) -> Qcow2Check:
    """Count every reference to every cluster of the qcow2 image ``drv`` (open as ``f``)
    and compare with the stored refcounts (``Qcow2Check.run``); a structure that could
    not be understood counts as a check error."""
    file_size = f.size()
    snaps, snap_bytes = parse_snapshot_table(f, drv.snapshots_offset, drv.nb_snapshots,
                                             drv.cluster_bits, file_size)
    areas, incomplete = _other_areas(f, drv, file_size)
    hdr = {
        "version": drv.version, "cluster_bits": drv.cluster_bits,
        "refcount_order": drv.refcount_order,
        "l1_table_offset": drv.l1_offset, "l1_size": drv.l1_size,
        "refcount_table_offset": drv.rt_offset,
        "refcount_table_clusters": drv.rt_clusters,
        "snapshots_offset": drv.snapshots_offset, "snapshots_size": snap_bytes,
        "extended_l2": bool(drv.incompatible & _qcow2.INCOMPAT_EXTL2),
        "external_data": drv.external_data,
    }
    chk = Qcow2Check(f, hdr, file_size)
    chk.run(snaps, areas)
    for reason in incomplete:
        chk.check_errors += 1
        chk.messages.append("ERROR check incomplete: " + reason)
    return chk


def _other_areas(f: File, drv: Any, file_size: int) -> Tuple[List[Tuple[int, int, str]],
                                                                List[str]]:
    """The structures besides the tables that own clusters, as ``qemu-img check`` counts
    them: the encryption header (LUKS) and, while autoclear bit 0 says they are valid, the
    persistent bitmaps' directory, tables and data clusters (QEMU's docs/interop/qcow2.rst,
    "Bitmaps"). Returns ``([(offset, nbytes, role)...], [reason...])``: a reason for each
    structure that could not be understood (the check is then incomplete)."""
    areas: List[Tuple[int, int, str]] = []
    incomplete: List[str] = []
    cs = drv.cluster_size
    if drv.crypto_header is not None:
        off, n = drv.crypto_header
        areas.append((off, n, "encryption header"))
    elif drv.crypt_method == 2:
        incomplete.append("LUKS encrypted image without an encryption header extension")
    if drv.version == 3 and drv.autoclear & AUTOCLEAR_BITMAPS:
        for etype, data, _off in drv.extensions:
            if etype != _qcow2.EXT_BITMAPS:
                continue
            try:
                doff, dsize, bitmaps = parse_bitmaps(f, bytes(data), drv.cluster_bits,
                                                     drv.size, file_size)
            except ImageFormatError as exc:
                incomplete.append(f"persistent bitmaps not understood ({exc})")
                break
            areas.append((doff, dsize, "bitmap directory"))
            for bm in bitmaps:
                areas.append((bm.table_offset, bm.table_size * 8, "bitmap table"))
                for off in bm.data_clusters():
                    areas.append((off, cs, "bitmap data"))
            break
    return areas, incomplete


def _repair_leaks(f: File, chk: Qcow2Check) -> Tuple[int, Set[int]]:
    """Lower each leaked cluster's refcount to its number of references.

    Crash safety: only counts that are too high change, each to a value still >= its
    references, and a refcount entry never straddles a sector; a torn or lost block write
    leaves each entry at its old or its new value, so the worst a crash leaves is the
    leak that was there before. One fdatasync makes the whole repair durable.
    """
    fixed = 0
    fixable: Set[int] = set()
    blocks = chk.leaked_blocks()
    for off, data, _dropped in blocks:
        f.pwrite(data, off)
    if blocks:
        f.fdatasync()
    for _off, _data, dropped in blocks:
        for c in dropped:
            n = chk.expected_count(c)
            chk.set_stored(c, n)
            if n == 1:
                fixable.add(c)
            chk.messages.append("Repaired leaked cluster %d refcount -> %d" % (c, n))
        fixed += len(dropped)
    return fixed, fixable


def check_qed(f: File, path: str, repair: bool) -> CheckResult:
    """Check the QED image open and locked as ``f`` (``_qed_check.check_qed``: every
    cluster after the header referenced exactly once). Leaked space cannot be given back
    without moving data, so ``repair`` changes nothing and says so. Raises
    ImageFormatError when the header is unusable."""
    chk = _qed_check.check_qed(f)
    messages = list(chk.messages)
    if repair and chk.leaks:
        messages.append("QED has no refcounts: leaked clusters are unused space; "
                        "nothing repaired")
    return CheckResult(
        corruptions=chk.corruptions, leaks=chk.leaks, check_errors=0,
        image_end_offset=chk.image_end_offset, messages=tuple(messages), path=path,
        format="qed", total_clusters=chk.total_clusters,
        allocated_clusters=chk.allocated_clusters,
        fragmented_clusters=chk.fragmented_clusters)
