"""``blockpull.check``: consistency check (and leak repair) of an image, like ``qemu-img check``.

This module opens, locks and runs; each format's check is the ``check`` of its entry in
``blockpull.formats.FORMATS`` (``check(file, path, repair) -> CheckResult``).
"""
from __future__ import annotations

import os
from typing import Optional, Union

from blockpull import formats
from blockpull._fileio import File
from blockpull.checks import CheckResult
from blockpull.errors import ImageFormatError
from blockpull.formats import Format, probe_path, refuse_fifo
from blockpull.locking import lock_image, without_read_locks

__all__ = ["CheckResult", "check"]


def _run(entry: Format, path: str, repair: bool) -> CheckResult:
    """Open ``path`` (writable only for a repair that writes), take QEMU's lock bytes and
    run the format's check."""
    assert entry.check is not None
    refuse_fifo(path)
    writable = repair and entry.repairs
    f = File(path, writable, "top")
    try:
        lock_image(f, writable, path)
        return entry.check(f, path, repair)
    finally:
        f.close()


def check(path: Union[str, "os.PathLike[str]"], repair: bool = False, *,
          format: Optional[str] = None, force_share: bool = False) -> CheckResult:
    """Check an image's metadata for consistency, as ``qemu-img check`` does.

    Counts corruptions (a cluster in use whose refcount is too low, a wrong COPIED flag,
    an unaligned or out-of-file offset) and leaks (a refcount higher than the references).
    ``repair=True`` fixes leaks only, crash-safely: it lowers too-high refcounts and then
    sets COPIED on the entries whose cluster count dropped to one; corruptions are left as
    they are and reported; after a repair the image is checked again and that result is
    returned (with ``leaks_fixed``), as ``qemu-img check -r`` reports. The format is
    probed unless ``format`` names it. ``force_share`` checks without taking QEMU's lock
    bytes (``qemu-img check -U``): an image a VM writes may then look inconsistent; it
    cannot be combined with ``repair``. Raises ``ImageFormatError`` when the header
    itself is unusable, ``ImageLockedError`` when another process has the image open for
    writing, ``ValueError`` for ``repair`` with ``force_share``.
    """
    p = os.fspath(path)
    if repair and force_share:
        raise ValueError(f"{p}: a repair writes to the image: it cannot share it "
                         f"(drop force_share / -U)")
    if format is None:
        format = probe_path(p, "top")
    entry = formats.get(format)
    if entry is None or entry.check is None:
        raise ImageFormatError(f"{p}: format {format!r} has no metadata to check "
                               f"(checkable: {', '.join(formats.checkable())})")
    if force_share:
        with without_read_locks():
            return _run(entry, p, False)
    res = _run(entry, p, bool(repair))
    if res.leaks_fixed:
        # what qemu-img check prints after a repair: the image checked again
        again = _run(entry, p, False)
        res = again._replace(leaks_fixed=res.leaks_fixed,
                             messages=res.messages + again.messages,
                             dropped_messages=res.dropped_messages + again.dropped_messages)
    return res
