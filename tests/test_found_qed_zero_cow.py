"""A write into part of a QED zero cluster (L2 entry 1) over a backing file: the rest of
the cluster keeps reading zeros. The new cluster is filled from what the cluster read
(zeros), never from the backing file below. qemu-io itself cannot be the oracle for the
writes here: QEMU 7.2's QED driver fills such a cluster from the backing file (a write
of 100 bytes brings the backing's data back around them), so the expected bytes are
built here and the result is read by qemu-img."""
import pytest

import blockpull

CS = 65536


@pytest.mark.parametrize("op", ["write", "zeroes", "pull-after"])
def test_partial_write_into_qed_zero_cluster(tmp_path, qemu, op):
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x22" * (4 * CS))
    top = qemu.create(tmp_path / "top.qed", 4 * CS, fmt="qed", backing="base.raw",
                      backing_fmt="raw")
    qemu.io(top, f"write -z {CS} {CS}", fmt="qed")            # cluster 1: zero entry
    expect = bytearray(b"\x22" * (4 * CS))
    expect[CS:2 * CS] = bytes(CS)
    with blockpull.open(top, backing_format="raw") as img:
        assert img.read(CS, CS) == bytes(CS)
        if op == "zeroes":
            img.write_zeroes(2 * CS - 4077, 4077 + 100)      # tail of 1, head of 2
            expect[2 * CS - 4077:2 * CS + 100] = bytes(4077 + 100)
        else:
            img.write(CS + 1000, b"\x05" * 100)
            expect[CS + 1000:CS + 1100] = b"\x05" * 100
        if op == "pull-after":
            img.pull().result()
    assert qemu.check(top, fmt="qed") == 0
    out = tmp_path / "out.raw"
    assert qemu.to_raw(top, str(out)) == bytes(expect)
