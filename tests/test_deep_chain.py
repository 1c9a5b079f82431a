"""Chains as deep as libvirt allows (200 images), judged by qemu-img.

QEMU has no depth cap; libvirt's is 200. A chain of MAX_CHAIN_DEPTH images opens, reads,
maps and pulls; one more image is refused; loops are still found by device and inode.
"""
from __future__ import annotations

import os
import subprocess

import pytest

import blockpull
from blockpull.image import MAX_CHAIN_DEPTH

MiB = 1 << 20
SIZE = 16 * MiB
CLUSTER = 65536


def build(tmp_path, depth, fmt="qcow2", extra=0):
    """``depth`` images, l0 at the bottom, each holding 64 KiB of byte i+1 at its own
    offset (every layer shows through); then the top takes small writes that copy on
    write partial clusters from deep in the chain. ``extra`` empty images more go on top.
    Each layer is written alone and linked after (building through ever deeper chains
    would cost depth squared opens)."""
    paths = []
    prev = None
    for i in range(depth + extra):
        p = str(tmp_path / f"l{i}.{fmt}")
        blockpull.create(p, SIZE, fmt=fmt, cluster_size=CLUSTER if fmt == "qcow2" else 4096)
        with blockpull.open(p) as img:
            if i < depth:
                img.write(i * CLUSTER % SIZE, bytes([i % 255 + 1]) * CLUSTER)
            if prev is not None:
                img.layers[0].set_backing(prev, fmt)
        paths.append(p)
        prev = os.path.basename(p)
    if not extra:
        with blockpull.open(paths[-1]) as img:
            for k in range(0, depth, 7):
                img.write(k * CLUSTER + 1000, b"\xee" * 512)
    return paths


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_chain_of_the_deepest_allowed_depth(tmp_path, qemu, fmt):
    assert MAX_CHAIN_DEPTH == 200
    paths = build(tmp_path, MAX_CHAIN_DEPTH, fmt)
    top = paths[-1]
    want = qemu.to_raw(top, tmp_path / "want.raw")       # QEMU opens all 200 too
    with blockpull.open(top, readonly=True) as img:
        assert len(img.chain) == MAX_CHAIN_DEPTH
        assert img.read(0, SIZE) == want
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    with blockpull.open(top) as img:
        img.pull(base=paths[100]).result(timeout=120)
    assert qemu.info(top)["backing-filename"] == os.path.basename(paths[100])
    qemu.assert_clean(top, fmt)
    assert qemu.compare(top, str(tmp_path / "want.raw"), fmt, "raw")
    with blockpull.open(top) as img:
        assert len(img.chain) == 102
        img.pull().result(timeout=120)
    qemu.assert_clean(top, fmt)
    assert "backing-filename" not in qemu.info(top)
    assert qemu.compare(top, str(tmp_path / "want.raw"), fmt, "raw")


def test_one_image_more_is_refused(tmp_path, qemu):
    paths = build(tmp_path, MAX_CHAIN_DEPTH - 1, extra=2)
    with pytest.raises(blockpull.BackingChainError, match="deeper than 200") as ei:
        blockpull.open(paths[-1], readonly=True)
    assert "flatten" in str(ei.value)
    # the refusal leaves no file open or locked: the images below open read-write
    with blockpull.open(paths[-2]) as img:
        assert len(img.chain) == MAX_CHAIN_DEPTH


def test_a_loop_deep_in_the_chain_is_found(tmp_path, qemu):
    paths = build(tmp_path, 150)
    # the bottom image now names an image 50 levels up: a loop of 100 images
    qemu.img("rebase", "-u", "-f", "qcow2", "-b", "l50.qcow2", "-F", "qcow2", paths[0])
    with pytest.raises(blockpull.BackingChainError, match="loops back to") as ei:
        blockpull.open(paths[-1], readonly=True)
    assert "l50.qcow2" in str(ei.value)
    # qemu-img refuses it too
    r = subprocess.run(["qemu-img", "info", "--backing-chain", paths[-1]],
                       capture_output=True, text=True)
    assert r.returncode != 0
