"""The QED check (_qed_check, beside the driver) against qemu-img check: invalid entries,
tables referenced twice, leaks; and the messages the check reports."""
import json
import struct

import pytest

import blockpull

CS = 64 << 10


def qemu_counts(qemu, path):
    """(exit code, corruptions, leaks, check errors) of qemu-img check."""
    r = qemu.img("check", "--output=json", str(path), check=False)
    d = json.loads(r.stdout)
    return r.returncode, d.get("corruptions", 0), d.get("leaks", 0), d["check-errors"]


def counts(r):
    return r.exit_code, r.corruptions, r.leaks, r.check_errors


@pytest.fixture
def qed(tmp_path, qemu):
    """A QED image with data in clusters 0-2 and 5: (path, L1 offset, L2 offset)."""
    p = qemu.create(tmp_path / "q.qed", 8 << 20, fmt="qed")
    qemu.io(p, f"write -P 1 0 {3 * CS}", f"write -P 2 {5 * CS} 4k", fmt="qed")
    with open(p, "rb") as f:
        l1 = struct.unpack_from("<Q", f.read(64), 40)[0]
        f.seek(l1)
        l2 = struct.unpack("<Q", f.read(8))[0]
    assert blockpull.check(p).clean
    return p, l1, l2


def put(path, off, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack("<Q", value))


@pytest.mark.parametrize("entry", ["past-end", "unaligned", "in-header"])
def test_invalid_data_entry_is_a_corruption(qed, qemu, entry):
    p, _l1, l2 = qed
    size = len(open(p, "rb").read())
    value = {"past-end": size + 16 * CS, "unaligned": CS * 20 + 512, "in-header": 0x200}[entry]
    put(p, l2 + 8 * 7, value)
    r = blockpull.check(p)
    assert counts(r) == qemu_counts(qemu, p)
    assert r.corruptions == 1
    assert f"ERROR data cluster (L2 0x{l2:x} entry 7) offset 0x{value:x} invalid" in r.messages


def test_l2_table_referenced_twice(qed, qemu):
    p, l1, l2 = qed
    put(p, l1 + 8, l2)                # L1 entry 1 names the L2 table of entry 0
    r = blockpull.check(p)
    assert counts(r) == qemu_counts(qemu, p)
    assert r.exit_code == 2
    c = l2 // CS
    assert f"ERROR cluster {c} referenced twice (L2 table (L1 entry 1))" in r.messages


def test_leak_messages_and_repair_note(qed, qemu):
    p, _l1, _l2 = qed
    end = len(open(p, "rb").read())
    with open(p, "ab") as f:
        f.write(b"x" * (3 * CS - (end % CS or CS)) + b"y" * CS)
    r = blockpull.check(p)
    assert counts(r) == qemu_counts(qemu, p)
    first = (end + CS - 1) // CS
    assert [m for m in r.messages if m.startswith("Leaked")] == \
        [f"Leaked cluster {c}" for c in range(first, first + r.leaks)]
    fixed = blockpull.check(p, repair=True)
    assert fixed.leaks == r.leaks and fixed.leaks_fixed == 0
    assert fixed.messages[-1] == ("QED has no refcounts: leaked clusters are unused space; "
                                  "nothing repaired")
