"""Backing file names as QEMU reads them: kernel path resolution and ``json:`` names.

A relative backing name is joined to the directory of the image that names it and left
to the kernel to resolve: ".." is never collapsed as text, since across a symlinked
directory ``a/L/../b`` is not ``a/b``. Files are told apart by (st_dev, st_ino). A
``json:`` name is accepted only in its plain-file shapes (docs/formats.md, "Backing files
and safety"; QEMU's docs/interop/qcow2.rst, "Header", backing_file_offset).
"""
from __future__ import annotations

import json
import os
import re
import stat
from typing import Any, Dict, List, Optional, Tuple

from blockpull.errors import BackingChainError, ImageFormatError
from blockpull.formats import JSON_FORMATS

__all__ = ["tidy", "kernel_abspath", "identity", "plain_name", "json_backing", "local_name",
           "backing_target", "resolve_backing", "data_file_target"]

_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def tidy(path: str) -> str:
    """``path`` without "." components and repeated slashes, which never change the file
    a name reaches (a trailing slash is kept: it does). ".." is kept: after a symlinked
    directory it leads to the link target's parent, not to the parent in the text, so
    only the kernel may resolve it."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    out = ("/" if path.startswith("/") else "") + "/".join(parts)
    if parts and (path.endswith("/") or path.endswith("/.")):
        # a trailing slash says "a directory": the kernel refuses it after a file
        # (ENOTDIR), as QEMU then does; dropped, it would open the file
        out += "/"
    return out or "."


def kernel_abspath(path: str) -> str:
    """An absolute name for ``path`` that the kernel resolves to the same file: joined
    to the working directory, ".." left for the kernel (``os.path.abspath`` would collapse
    it as text and, across a symlinked directory, name another file)."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    return tidy(path)


def identity(st: os.stat_result) -> tuple:
    """What tells one file from another, as ``File.identity`` gives it for an open file:
    (st_dev, st_ino), or (-1, st_rdev) for a block device (any of its device nodes)."""
    if stat.S_ISBLK(st.st_mode):
        return (-1, st.st_rdev)
    return (st.st_dev, st.st_ino)


def plain_name(name: str) -> str:
    """A backing name without its "file:" protocol prefix."""
    return name[5:] if name.startswith("file:") else name


def _flat_json(obj: Dict[str, Any], prefix: str, out: Dict[str, Any]) -> bool:
    """Flatten nested objects of a ``json:`` name into dotted keys ("file.filename"), as
    QEMU reads them; False if a key is given twice (nested and flat)."""
    for key, value in obj.items():
        full = prefix + key
        if isinstance(value, dict):
            if not _flat_json(value, full + ".", out):
                return False
        elif full in out:
            return False
        else:
            out[full] = value
    return True


def json_backing(name: str) -> Optional[Tuple[str, str]]:
    """``(filename, format)`` of a ``json:`` backing name that opens a plain local file:
    exactly a format driver (qcow2, qed or raw) over a ``file`` child with a filename,
    nested (``"file": {"driver": "file", "filename": F}``) or flat (``"file.driver"``,
    ``"file.filename"``). None for any other shape (another protocol, extra options,
    malformed JSON)."""
    def pairs(items: List[Tuple[str, Any]]) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        for k, v in items:
            if k in d:
                raise ValueError(f"key {k!r} given twice")
            d[k] = v
        return d
    try:
        obj = json.loads(name[5:], object_pairs_hook=pairs)
    except ValueError:
        return None
    flat: Dict[str, Any] = {}
    if not isinstance(obj, dict) or not _flat_json(obj, "", flat):
        return None
    if set(flat) != {"driver", "file.driver", "file.filename"}:
        return None
    fmt, proto, filename = flat["driver"], flat["file.driver"], flat["file.filename"]
    if fmt not in JSON_FORMATS or proto != "file" or not isinstance(filename, str) \
            or not filename:
        return None
    return filename, fmt


def local_name(name: str) -> Optional[str]:
    """The local file name a backing name stands for (without "file:", the filename of
    a plain-file ``json:`` name), or None for a protocol."""
    if name.startswith("json:"):
        parsed = json_backing(name)
        return parsed[0] if parsed else None
    if _PROTOCOL.match(name) and not name.startswith("file:"):
        return None
    return plain_name(name)


def backing_target(name: str, parent: str) -> Tuple[str, Optional[str]]:
    """``(path, format)`` of backing file ``name`` recorded in the image at ``parent``.

    A relative name is joined to the directory of ``parent`` as it stands and resolved
    by the kernel when opened, as QEMU does (no ".." is collapsed as text). ``format``
    is the one a ``json:`` name gives (plain-file shapes only, see ``json_backing``),
    else None. Raises BackingChainError for empty names, names with NUL, names over 1023
    bytes, and protocols other than "file:" (any other ``json:`` shape included)."""
    if not name:
        raise BackingChainError(f"{parent}: empty backing file name")
    if "\0" in name:
        raise BackingChainError(f"{parent}: backing file name contains NUL")
    if len(name.encode("utf-8", "surrogateescape")) > 1023:
        raise BackingChainError(f"{parent}: backing file name longer than 1023 bytes")
    local = local_name(name)
    if local is None:
        raise BackingChainError(
            f"{parent}: backing file {name!r} is not a plain local path (protocols are refused)")
    parsed = json_backing(name) if name.startswith("json:") else None
    fmt = parsed[1] if parsed else None
    if "\0" in local:
        raise BackingChainError(f"{parent}: backing file name contains NUL")
    if not os.path.isabs(local):
        local = os.path.join(os.path.dirname(kernel_abspath(parent)), local)
    return tidy(local), fmt


def resolve_backing(name: str, parent: str) -> str:
    """The path of backing file ``name`` recorded in the image at ``parent`` (see
    ``backing_target``). Raises BackingChainError for names that are not local files."""
    return backing_target(name, parent)[0]


def data_file_target(name: str, image: str) -> str:
    """The path of the external data file ``name`` recorded in the qcow2 image at
    ``image`` (header extension 0x44415441, QEMU's docs/interop/qcow2.rst, "Header
    extensions"). A relative name is joined to the directory of ``image``, as a backing
    name is (QEMU opens it from its working directory: both agree when run there).
    Raises ImageFormatError for empty names, names with NUL, names over 1023 bytes and
    anything but a plain local path ("file:" aside)."""
    if not name or "\0" in name or len(name.encode("utf-8", "surrogateescape")) > 1023:
        raise ImageFormatError(f"{image}: external data file name {name!r} is empty, holds "
                               f"a NUL or is longer than 1023 bytes; fix it with 'qemu-img "
                               f"amend -o data_file=NAME'")
    if name.startswith("json:") or (_PROTOCOL.match(name) and not name.startswith("file:")):
        raise ImageFormatError(f"{image}: external data file {name!r} is not a plain local "
                               f"path (protocols are refused); fix it with 'qemu-img amend "
                               f"-o data_file=NAME'")
    local = plain_name(name)
    if not os.path.isabs(local):
        local = os.path.join(os.path.dirname(kernel_abspath(image)), local)
    return tidy(local)
