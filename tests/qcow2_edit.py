"""Byte-level editing of qcow2 files for tests: read header fields, find table entries,
poke values. Independent of blockpull's driver, so a bug there cannot hide one here."""
from __future__ import annotations

import struct
from typing import Dict, Tuple

HEADER_FIELDS = [  # name, offset, struct format
    ("magic", 0, ">I"), ("version", 4, ">I"), ("backing_file_offset", 8, ">Q"),
    ("backing_file_size", 16, ">I"), ("cluster_bits", 20, ">I"), ("size", 24, ">Q"),
    ("crypt_method", 32, ">I"), ("l1_size", 36, ">I"), ("l1_table_offset", 40, ">Q"),
    ("refcount_table_offset", 48, ">Q"), ("refcount_table_clusters", 56, ">I"),
    ("nb_snapshots", 60, ">I"), ("snapshots_offset", 64, ">Q"),
    ("incompatible_features", 72, ">Q"), ("compatible_features", 80, ">Q"),
    ("autoclear_features", 88, ">Q"), ("refcount_order", 96, ">I"),
    ("header_length", 100, ">I"),
]
FIELD = {name: (off, fmt) for name, off, fmt in HEADER_FIELDS}


def header(path) -> Dict[str, int]:
    """All header fields of a qcow2 file."""
    with open(path, "rb") as f:
        raw = f.read(104)
    return {name: struct.unpack_from(fmt, raw, off)[0] for name, off, fmt in HEADER_FIELDS
            if off + struct.calcsize(fmt) <= len(raw)}


def poke(path, offset: int, fmt: str, value) -> None:
    """Write one struct-packed value at a file offset."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def peek(path, offset: int, fmt: str):
    """Read one struct-packed value at a file offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def set_field(path, name: str, value: int) -> None:
    """Overwrite one header field."""
    off, fmt = FIELD[name]
    poke(path, off, fmt, value)


def l2_entry_pos(path, vaddr: int) -> int:
    """File offset of the active L2 entry for virtual address ``vaddr`` (its L2 table
    must exist)."""
    h = header(path)
    cb = h["cluster_bits"]
    l2_bits = cb - 3
    c = vaddr >> cb
    l1e = peek(path, h["l1_table_offset"] + 8 * (c >> l2_bits), ">Q")
    l2 = l1e & 0x00FFFFFFFFFFFE00
    assert l2, "no L2 table there"
    return l2 + 8 * (c & ((1 << l2_bits) - 1))


def l2_entry(path, vaddr: int) -> int:
    """The active L2 entry for ``vaddr``."""
    return peek(path, l2_entry_pos(path, vaddr), ">Q")


def l1_entry_pos(path, index: int) -> int:
    """File offset of active L1 entry ``index``."""
    return header(path)["l1_table_offset"] + 8 * index


def refcount_pos(path, cluster: int) -> Tuple[int, int]:
    """(file offset, width in bits) of the stored refcount of host ``cluster``
    (refcount orders 3..6 only, i.e. 8..64-bit entries)."""
    h = header(path)
    cb = h["cluster_bits"]
    order = h.get("refcount_order", 4) if h["version"] == 3 else 4
    bits = 1 << order
    assert bits >= 8
    per_block = (1 << cb) * 8 // bits
    rte = peek(path, h["refcount_table_offset"] + 8 * (cluster // per_block), ">Q")
    assert rte, "no refcount block there"
    return rte + (cluster % per_block) * bits // 8, bits


_FMT = {8: ">B", 16: ">H", 32: ">I", 64: ">Q"}


def get_refcount(path, cluster: int) -> int:
    pos, bits = refcount_pos(path, cluster)
    return peek(path, pos, _FMT[bits])


def set_refcount(path, cluster: int, value: int) -> None:
    pos, bits = refcount_pos(path, cluster)
    poke(path, pos, _FMT[bits], value)
