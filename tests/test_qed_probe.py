"""QED backings with no recorded format: the backing's magic decides, qcow2 or QED only.

QED records a backing format only as feature bit 0x04 ("backing is raw"). With the bit
clear QEMU probes; libvirt probes too but accepts only a format with a header of its own.
blockpull does the same: a format the caller names wins, raw is never probed, anything
else is refused. Every case is judged by qemu-img (compare, check, info, map).
"""
from __future__ import annotations

import random
import struct
import subprocess
import sys

import pytest

import blockpull
from blockpull import _qed
from relhelp import child_env

MiB = 1 << 20


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "blockpull", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=child_env(),
                          timeout=60)


def features(path):
    with open(path, "rb") as f:
        f.seek(16)
        return struct.unpack("<Q", f.read(8))[0]


def chain(qemu, tmp_path, mid_fmt="qed", base_fmt="qed"):
    """base <- mid <- top.qed, made by qemu-img create -F as a user makes them."""
    base = qemu.create(tmp_path / f"base.{base_fmt}", 4 * MiB, fmt=base_fmt)
    qemu.io(base, "write -P 1 0 1M", "write -P 2 2M 1M", fmt=base_fmt)
    mid = qemu.create(tmp_path / f"mid.{mid_fmt}", 4 * MiB, fmt=mid_fmt,
                      backing=f"base.{base_fmt}", backing_fmt=base_fmt)
    qemu.io(mid, "write -P 3 512k 128k", "write -z 2M 64k", fmt=mid_fmt)
    top = qemu.create(tmp_path / "top.qed", 4 * MiB, fmt="qed",
                      backing=f"mid.{mid_fmt}", backing_fmt=mid_fmt)
    qemu.io(top, "write -P 4 100k 10k", fmt="qed")
    assert not features(top) & _qed.F_BACKING_RAW
    return str(top), str(mid), str(base)


@pytest.mark.parametrize("mid_fmt,base_fmt", [("qed", "qed"), ("qcow2", "qcow2"),
                                              ("qcow2", "qed"), ("qed", "qcow2")])
def test_open_read_write_pull_with_no_arguments(tmp_path, qemu, mid_fmt, base_fmt):
    top, mid, base = chain(qemu, tmp_path, mid_fmt, base_fmt)
    want = qemu.to_raw(top, tmp_path / "want.raw")
    with blockpull.open(top, readonly=True) as img:
        assert [c.format for c in img.chain] == ["qed", mid_fmt, base_fmt]
        assert img.read(0, img.size) == want
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    with blockpull.open(top) as img:
        img.write(3 * MiB + 5, b"\x55" * 70_000)       # copy-on-write from the chain
    qemu.assert_clean(top, "qed")
    want = qemu.to_raw(top, tmp_path / "want.raw")
    with blockpull.open(top) as img:
        img.pull().result(timeout=60)
    qemu.assert_clean(top, "qed")
    assert "backing-filename" not in qemu.info(top)
    assert qemu.compare(top, str(tmp_path / "want.raw"), "qed", "raw")


@pytest.mark.parametrize("base_fmt", ["qcow2", "qed"])
def test_partial_pull_keeps_a_base_the_next_open_finds(tmp_path, qemu, base_fmt):
    """After a pull that keeps a non-raw base under a QED top, QED can record only that
    the base is not raw: the next open probes it, with no arguments."""
    top, mid, base = chain(qemu, tmp_path, "qed", base_fmt)
    want = qemu.to_raw(top, tmp_path / "want.raw")
    with blockpull.open(top) as img:
        img.pull(base=base).result(timeout=60)
    info = qemu.info(top)
    assert info["backing-filename"] == f"base.{base_fmt}"
    assert "backing-filename-format" not in info       # the raw bit is clear
    assert not features(top) & _qed.F_BACKING_RAW
    qemu.assert_clean(top, "qed")
    assert qemu.compare(top, str(tmp_path / "want.raw"), "qed", "raw")
    with blockpull.open(top, readonly=True) as img:
        assert [c.format for c in img.chain] == ["qed", base_fmt]
        assert img.read(0, img.size) == want
        assert [e.to_json() for e in img.map()] == qemu.map(top)


def test_partial_pull_keeping_a_raw_base_sets_the_raw_bit(tmp_path, qemu):
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(3).randbytes(2 * MiB) + bytes(2 * MiB))
    mid = qemu.create(tmp_path / "mid.qed", 4 * MiB, fmt="qed", backing="base.raw",
                      backing_fmt="raw")
    qemu.io(mid, "write -P 3 1M 64k", fmt="qed")
    top = qemu.create(tmp_path / "top.qed", 4 * MiB, fmt="qed", backing="mid.qed",
                      backing_fmt="qed")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        img.pull(base=str(raw)).result(timeout=60)
    info = qemu.info(top)
    assert (info["backing-filename"], info["backing-filename-format"]) == ("base.raw", "raw")
    assert qemu.compare(top, str(want), "qed", "raw")
    with blockpull.open(top, readonly=True) as img:
        assert [c.format for c in img.chain] == ["qed", "raw"]


def qed_over_raw_bit_clear(qemu, tmp_path, content):
    raw = tmp_path / "b.img"
    raw.write_bytes(content)
    top = str(tmp_path / "t.qed")
    qemu.img("create", "-q", "-f", "qed", "-u", "-b", "b.img", "-F", "qcow2", top, "1M")
    assert not features(top) & _qed.F_BACKING_RAW
    return top


def test_raw_is_never_the_result_of_a_probe(tmp_path, qemu):
    top = qed_over_raw_bit_clear(qemu, tmp_path, b"\x07" * MiB)
    with pytest.raises(blockpull.BackingChainError, match="backing_format") as ei:
        blockpull.open(top, readonly=True)
    assert "neither qcow2 nor QED" in str(ei.value) and "b.img" in str(ei.value)
    with pytest.raises(blockpull.BackingChainError):
        blockpull.open(top)
    # the command line says how to name it
    r = cli("info", top)
    assert r.returncode == 2 and "-F/--backing-format" in r.stderr, r.stderr
    # named, it opens, and reads what qemu-io reads with the format named
    with blockpull.open(top, readonly=True, backing_format="raw") as img:
        assert img.chain[1].format == "raw"
        assert img.read(0, MiB) == b"\x07" * MiB
    assert qemu.compare(f'json:{{"driver":"qed","file":{{"driver":"file","filename":"{top}"}},'
                        f'"backing":{{"driver":"raw","file":{{"driver":"file","filename":'
                        f'"{tmp_path / "b.img"}"}}}}}}', str(tmp_path / "b.img"), None, "raw")


@pytest.mark.parametrize("magic", [b"\x00" * 8, b"LUKS\xba\xbe\x00\x01", b"VMDK"])
def test_other_headers_are_refused(tmp_path, qemu, magic):
    top = qed_over_raw_bit_clear(qemu, tmp_path, magic + bytes(MiB - len(magic)))
    with pytest.raises(blockpull.BackingChainError, match="neither qcow2 nor QED"):
        blockpull.open(top, readonly=True)


def test_a_named_format_wins_over_the_probe(tmp_path, qemu):
    top, mid, base = chain(qemu, tmp_path, "qed", "qed")
    with blockpull.open(top, readonly=True, backing_format={"mid.qed": "raw"}) as img:
        assert [c.format for c in img.chain] == ["qed", "raw"]     # raw has no backing
        with open(mid, "rb") as f:
            assert img.read(0, 4096) == f.read(4096)         # the QED header itself
    with blockpull.open(top, readonly=True, backing_format="qed") as img:
        assert [c.format for c in img.chain] == ["qed"] * 3
    # a named format the magic contradicts is refused, not guessed around
    with pytest.raises(blockpull.BackingChainError, match="not a qcow2 image"):
        blockpull.open(top, readonly=True, backing_format={"mid.qed": "qcow2"})


def test_qcow2_without_a_recorded_format_stays_refused(tmp_path, qemu):
    qemu.create(tmp_path / "b.qcow2", MiB)
    top = str(tmp_path / "t.qcow2")
    blockpull.create(top, MiB, backing="b.qcow2", backing_format="qcow2")
    with open(top, "r+b") as f:          # the backing-format extension becomes the end
        data = bytearray(f.read(65536))
        i = data.find(b"\xe2\x79\x2a\xca")
        data[i:i + 4] = bytes(4)
        f.seek(0)
        f.write(data)
    assert "backing-filename-format" not in qemu.info(top)
    with pytest.raises(blockpull.BackingChainError, match="no recorded format"):
        blockpull.open(top, readonly=True)
    r = cli("map", top)
    assert r.returncode == 2 and "-F/--backing-format" in r.stderr, r.stderr
    r = cli("map", "-F", "qcow2", "--output", "json", top)
    assert r.returncode == 0, r.stderr
    assert r.stdout == qemu.img("map", "--output=json", top).stdout


def test_command_line_pull_of_a_qed_chain_with_no_arguments(tmp_path, qemu):
    top, mid, base = chain(qemu, tmp_path, "qed", "qcow2")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    r = cli("pull", "--base", "base.qcow2", top)
    assert r.returncode == 0, r.stderr
    assert qemu.info(top)["backing-filename"] == "base.qcow2"
    r = cli("pull", top)
    assert r.returncode == 0, r.stderr
    assert "backing-filename" not in qemu.info(top)
    qemu.assert_clean(top, "qed")
    assert qemu.compare(top, str(want), "qed", "raw")
