"""The image formats this package knows, in one table, and opening a file as one of them.

Each ``Format`` names its driver class, its magic probe, how to create one, how to check
one, whether it may be a top (writable) image and whether its magic may be probed. A new
format adds one driver module and one entry in ``FORMATS``.

Probing follows libvirt's rule for safe probing (docs/formats.md, "Backing files and
safety"): only a format with a header of its own (qcow2, QED) is ever found by its magic;
raw is never guessed, since a guest can write any header into a raw disk.
"""
from __future__ import annotations

import os
import stat
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from blockpull import _qcow2, _qed, _raw
from blockpull._fileio import File
from blockpull.checks import check_qcow2, check_qed
from blockpull.errors import BlockpullError, ImageFormatError

__all__ = ["Format", "FORMATS", "AUTO_SAFE", "JSON_FORMATS", "get", "creatable",
           "checkable", "probe_magic", "refuse_fifo", "probe_path", "open_driver"]


class Format(NamedTuple):
    """One image format.

    ``driver(file, writable)`` opens it; ``probe(head)`` says whether the file's first 64
    bytes start like it; ``create(path, size, cluster_size=, compat=, backing=,
    backing_format=)`` writes a new one (None: not creatable); ``check(file, path, repair)
    -> CheckResult`` checks its metadata (None: nothing to check); ``repairs``: a
    repairing check writes (the file is then opened writable); ``top``: it may be opened
    writable (False: a backing only); ``auto_safe``: its magic may be probed.
    """
    name: str
    driver: Any
    probe: Callable[[bytes], bool]
    create: Optional[Callable[..., None]]
    check: Optional[Callable[..., Any]]
    repairs: bool
    top: bool
    auto_safe: bool


#: format name -> Format
FORMATS: Dict[str, Format] = {
    "qcow2": Format("qcow2", _qcow2.Qcow2, _qcow2.probe, _qcow2.create, check_qcow2,
                    repairs=True, top=True, auto_safe=True),
    "qed": Format("qed", _qed.Qed, _qed.probe, _qed.create, check_qed,
                  repairs=False, top=True, auto_safe=True),
    "raw": Format("raw", _raw.Raw, _raw.probe, None, None,
                  repairs=False, top=False, auto_safe=False),
}

#: the formats a magic may show (qcow2 and QED: a header of their own)
AUTO_SAFE = tuple(name for name, fmt in FORMATS.items() if fmt.auto_safe)
#: the format drivers a ``json:`` backing name may name over its ``file`` child
JSON_FORMATS = tuple(FORMATS)


def get(name: str) -> Optional[Format]:
    """The Format called ``name``, or None."""
    return FORMATS.get(name)


def creatable() -> List[str]:
    """Names of the formats ``create`` can make."""
    return [name for name, fmt in FORMATS.items() if fmt.create is not None]


def checkable() -> List[str]:
    """Names of the formats with metadata to check, sorted."""
    return sorted(name for name, fmt in FORMATS.items() if fmt.check is not None)


def probe_magic(f: File) -> Optional[str]:
    """The format the magic of the open file ``f`` shows: qcow2 or QED only (a header of
    its own, libvirt's rule for safe probing), else None: raw is never probed."""
    head = f.pread(0, 64)
    for name in AUTO_SAFE:
        if FORMATS[name].probe(head):
            return name
    return None


def _not_probed(path: str) -> ImageFormatError:
    return ImageFormatError(f"{path}: not a qcow2 or QED image; if it is raw, name the format "
                            f"(format='raw'; -f raw on the command line)")


def refuse_fifo(path: str) -> None:
    """Raise ImageFormatError if ``path`` is a named pipe: opening one waits for a
    writer, for ever if none comes (a backing name can point at one)."""
    try:
        st = os.stat(path)
    except OSError:
        return      # opening it says what is wrong
    if stat.S_ISFIFO(st.st_mode):
        raise ImageFormatError(f"{path}: is a named pipe (FIFO), not an image file or "
                               f"block device")


def probe_path(path: str, role: str, not_probed: Optional[BlockpullError] = None) -> str:
    """The format of the image at ``path``, from its magic (raw is never guessed).
    ``role`` is "top" or "backing" (for error messages). Raises ``not_probed`` (default:
    an ImageFormatError) when it shows no format."""
    refuse_fifo(path)
    f = File(path, False, role)
    try:
        fmt = probe_magic(f)
    finally:
        f.close()
    if fmt is None:
        raise not_probed or _not_probed(path)
    return fmt


def open_driver(path: str, fmt: Optional[str], writable: bool, role: str,
                not_probed: Optional[BlockpullError] = None) -> Any:
    """Open ``path`` as ``fmt`` and return its driver (None: by its qcow2/QED magic,
    raising ``not_probed``, default an ImageFormatError, when it shows neither).
    Raises ImageFormatError (a directory, a FIFO, an unknown format, raw opened writable,
    bad magic) and OSError."""
    refuse_fifo(path)
    try:
        f = File(path, writable, role)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise ImageFormatError(f"{path}: is a directory, not an image")
    try:
        if fmt is None:
            fmt = probe_magic(f)
            if fmt is None:
                raise not_probed or _not_probed(path)
        entry = FORMATS.get(fmt)
        if entry is None:
            raise ImageFormatError(f"{path}: unsupported format {fmt!r} (qcow2, qed or raw)")
        if writable and not entry.top:
            raise ImageFormatError(f"{path}: {fmt} images can only be backing files")
        head = f.pread(0, 64)
        if entry.auto_safe and not entry.probe(head):
            raise ImageFormatError(f"{path}: not a {fmt} image (bad magic)")
        return entry.driver(f, writable)
    except BaseException:
        f.close()
        raise
