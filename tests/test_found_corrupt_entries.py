"""Writes, pulls and copy-on-read refuse an L2 entry that reads refuse, as QEMU does
(it returns EIO and marks the image corrupt): a qcow2 extended L2 bitmap that marks a
subcluster both allocated and zero, or has allocated subclusters without a host offset
(QEMU's docs/interop/qcow2.rst, "Extended L2 Entries"), and a standard L2 entry whose host
offset is unaligned or past the end of the file. Before, a pull over such a top reported
success, and a guest write went to the offset the bad entry named (1 TiB in: the file grew
to 1 TiB)."""
import hashlib
import os

import pytest

import blockpull
from blockpull.errors import ImageFormatError
from qcow2_edit import header, peek, poke

CS = 65536
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def chain(qemu, d, ext):
    """base (pattern 1) <- top: cluster 0 has 3 subclusters of its own (ext) or 6 KiB,
    cluster 1 is whole; returns (top, offset of the top's first L2 table)."""
    base = qemu.create(d / "base.qcow2", 1 << 20, opts=[f"cluster_size={CS}"])
    qemu.io(base, "write -P 1 0 1M")
    top = qemu.create(d / "top.qcow2", 1 << 20, backing="base.qcow2",
                      opts=[f"cluster_size={CS}" + (",extended_l2=on" if ext else "")])
    qemu.io(top, f"write -P 2 0 {CS // 32 * 3}", f"write -P 3 {CS} {CS}")
    h = header(top)
    return top, peek(top, h["l1_table_offset"], ">Q") & OFFSET_MASK


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.fstat(f.fileno()).st_size


def attempt(top, op):
    with blockpull.open(top, copy_on_read=(op == "cor")) as img:
        if op == "pull":
            img.pull().result()
        elif op == "write":
            img.write(CS + 100, b"x" * 10)
        elif op == "zero":
            img.write_zeroes(CS + 512, 4096)
        elif op == "zero-cluster":
            img.write_zeroes(CS, CS)
        else:
            img.read(0, 4 * CS)


def refused(qemu, top, op, match):
    before = digest(top)
    assert qemu.check(top) == 2            # qemu-img calls it corrupt
    with pytest.raises(ImageFormatError, match=match):
        attempt(top, op)
    assert digest(top) == before           # nothing written
    assert qemu.check(top) == 2


@pytest.mark.parametrize("op", ["pull", "write", "zero", "cor"])
@pytest.mark.parametrize("case", ["both", "no-offset"])
def test_extl2_bad_bitmap_refused(tmp_path, qemu, case, op):
    top, l2 = chain(qemu, tmp_path, True)
    if case == "both":
        # cluster 1's subcluster 0 allocated (whole cluster written) and zero
        poke(top, l2 + 16 + 8, ">Q", peek(top, l2 + 16 + 8, ">Q") | (1 << 32))
        match = "both allocated and zero"
    else:
        poke(top, l2 + 16 + 8, ">Q", 0)
        poke(top, l2 + 16, ">Q", 0)
        poke(top, l2 + 16 * 1 + 8, ">Q", 0x5)    # cluster 1: no offset, subclusters 0, 2
        match = "no host offset"
    refused(qemu, top, op, match)


@pytest.mark.parametrize("op", ["write", "zero", "zero-cluster", "pull"])
@pytest.mark.parametrize("case", ["unaligned", "past-end"])
@pytest.mark.parametrize("ext", [False, True], ids=["std", "extl2"])
def test_bad_host_offset_refused(tmp_path, qemu, ext, case, op):
    top, l2 = chain(qemu, tmp_path, ext)
    pos = l2 + (16 if ext else 8)                # cluster 1's entry
    e = peek(top, pos, ">Q")
    if case == "unaligned":
        poke(top, pos, ">Q", e + 512)
        match = "unaligned offset"
    else:
        poke(top, pos, ">Q", (e & ~OFFSET_MASK) | (1 << 40))
        match = "past the end of the file"
    refused(qemu, top, op, match)
