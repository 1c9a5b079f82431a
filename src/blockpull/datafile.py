"""Opening the external data file of a qcow2 image (incompatible bit 2).

Such an image keeps its L1/L2 tables and refcounts in the image file and every data
cluster in another file, at the cluster's guest offset (QEMU's docs/interop/qcow2.rst,
"Header", incompatible bit 2 and autoclear bit 1; "Header extensions", type 0x44415441
names the file). The data file of the image that was opened is followed; one named by a
*backing* image only when the caller allows it, as QEMU does since CVE-2024-32498: a
backing file's header could otherwise make a reader of the chain open any file.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Set

from blockpull._fileio import File
from blockpull.errors import DataFileNotAllowedError, ImageFormatError
from blockpull.locking import lock_image
from blockpull.paths import data_file_target

__all__ = ["attach_data_file"]


def attach_data_file(drv: Any, image: str, role: str, allow: bool, lock_files: bool,
                     seen: Set[tuple]) -> None:
    """Open the external data file of ``drv`` (the driver of the image at ``image``, in
    ``role`` "top" or "backing") and hand it to the driver: writable with a writable top,
    locked with QEMU's lock bytes when ``lock_files``. A file already in the chain
    (``seen``: identities of its images and data files) is refused, then the data file's
    identity is added. Nothing happens for an image without a data file.

    Raises DataFileNotAllowedError for a backing's data file unless ``allow``;
    ImageFormatError for a bad name, a data file that is missing, a directory or already
    part of the chain; ImageLockedError; OSError."""
    if not getattr(drv, "external_data", False):
        return
    name = drv.data_file_name
    if role != "top" and not allow:
        raise DataFileNotAllowedError(
            f"{image}: backing image names an external data file {name!r}, which is not "
            f"followed by default (a backing's data file may point at any file); if you "
            f"trust the chain, pass allow_data_file=True (--allow-data-file)")
    path = data_file_target(name, image)
    if not os.path.exists(path):
        raise ImageFormatError(f"{image}: its external data file {path} does not exist "
                               f"(a relative name is taken from the image's directory)")
    _refuse_special(image, path, os.stat(path).st_mode)   # before opening it at all
    f = File(path, bool(drv.writable), "data")
    try:
        _refuse_special(image, path, os.fstat(f.fd).st_mode)   # what was opened
        ident = f.identity()
        if ident in seen:
            raise ImageFormatError(f"{image}: its external data file {path} is an image or "
                                   f"data file of the same chain")
        if lock_files:
            lock_image(f, bool(drv.writable), path)
        drv.attach_data_file(f)
    except BaseException:
        f.close()
        raise
    seen.add(ident)


def _refuse_special(image: str, path: str, mode: int) -> None:
    """A data file is a regular file or a block device: a directory, FIFO, socket or
    character device is refused (opening some of them has effects of its own)."""
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise ImageFormatError(f"{image}: its external data file {path} is a directory "
                               f"or special file, not a file or block device")
