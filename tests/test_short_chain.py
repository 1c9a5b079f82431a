"""Chains with an image shorter than the ones below it, judged by qemu-img.

A read past the end of an image in a chain is zeros and does not fall through to the
images below it, so a pull that keeps the base must record those zeros in the top (zero
clusters in qcow2 v3 and QED, zero data in qcow2 v2), at every depth."""
import shutil

import pytest

import blockpull

M = 1 << 20


def build(tmp_path, qemu, layers):
    """``layers``: bottom first, (name, format, size, qemu-io commands, create options).
    Each image is backed by the one before it. Returns the paths, bottom first."""
    paths = []
    for name, fmt, size, cmds, opts in layers:
        back = paths[-1] if paths else None
        p = qemu.create(tmp_path / name, size, fmt=fmt,
                        backing=back and back.rsplit("/", 1)[1],
                        backing_fmt=back and layers[len(paths) - 1][1], opts=opts)
        if cmds:
            qemu.io(p, *cmds, fmt=fmt)
        paths.append(p)
    return paths


def formats(tmp_path):
    """Backing formats by file name (QED records none for a qcow2 or QED backing)."""
    return {p.name: p.suffix[1:] for p in tmp_path.iterdir() if p.suffix in (".qcow2", ".qed")}


def pull_and_judge(tmp_path, qemu, top, base, fmt="qcow2"):
    """Pull ``top`` down to ``base`` (a name or None) and check it reads as before."""
    want = tmp_path / "before.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top, backing_format=formats(tmp_path)) as img:
        info = img.pull(base=base).result(timeout=60)
    assert info.status == "completed"
    assert info.cur == info.end
    qemu.assert_clean(top, fmt)
    assert qemu.compare(top, str(want), fmt, "raw"), "the pull changed what the image reads"
    assert qemu.info(top).get("backing-filename") == base
    return info


def test_report_input_short_intermediate(tmp_path, qemu):
    base, mid, top = build(tmp_path, qemu, [
        ("base.qcow2", "qcow2", 16 * M, ["write -P 0x22 0 16M"], ()),
        ("mid.qcow2", "qcow2", 5 * M, [], ()),
        ("top.qcow2", "qcow2", 16 * M, [], ()),
    ])
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)
        assert img.read(5 * M, 16) == bytes(16)
    info = pull_and_judge(tmp_path, qemu, top, "base.qcow2")
    # [5M, 16M) read zeros through the short mid: the top records them as zero clusters
    assert info.end == 11 * M and info.zeroed_bytes == 11 * M and info.copied_bytes == 0
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    assert qemu.map(top)[-1] == {"start": 5 * M, "length": 11 * M, "depth": 0,
                                 "present": True, "zero": True, "data": False}


@pytest.mark.parametrize("top_fmt,opts", [("qcow2", ("compat=1.1",)),
                                          ("qcow2", ("compat=0.10",)),
                                          ("qed", ())])
def test_top_formats(tmp_path, qemu, top_fmt, opts):
    ext = top_fmt
    _, _, top = build(tmp_path, qemu, [
        ("base.qcow2", "qcow2", 16 * M, ["write -P 0x22 0 16M"], ()),
        ("mid.qcow2", "qcow2", 5 * M, ["write -P 0x33 1M 1M"], ()),
        (f"top.{ext}", top_fmt, 16 * M, ["write -P 0x44 9M 64k"], opts),
    ])
    info = pull_and_judge(tmp_path, qemu, top, "base.qcow2", top_fmt)
    assert info.end == 1 * M + 11 * M - 64 * 1024


def test_qed_chain(tmp_path, qemu):
    _, _, top = build(tmp_path, qemu, [
        ("base.qed", "qed", 16 * M, ["write -P 0x22 0 16M"], ()),
        ("mid.qed", "qed", 5 * M, ["write -P 0x33 4M 512k"], ()),
        ("top.qed", "qed", 16 * M, [], ()),
    ])
    pull_and_judge(tmp_path, qemu, top, "base.qed", "qed")


def deep(tmp_path, qemu, top_fmt="qcow2"):
    """base 16M <- m1 12M <- m2 5M+512 (not cluster aligned) <- m3 16M <- top 16M."""
    return build(tmp_path, qemu, [
        ("base.qcow2", "qcow2", 16 * M, ["write -P 0x22 0 16M"], ()),
        ("m1.qcow2", "qcow2", 12 * M, ["write -P 0x11 10M 1M", "write -z 3M 64k"], ()),
        ("m2.qcow2", "qcow2", 5 * M + 512, ["write -P 0x12 5M 512"], ()),
        ("m3.qcow2", "qcow2", 16 * M, ["write -P 0x13 14M 64k", "write -z 15M 64k"], ()),
        (f"top.{top_fmt}", top_fmt, 16 * M, ["write -P 0x14 0 64k"], ()),
    ])


@pytest.mark.parametrize("top_fmt", ["qcow2", "qed"])
@pytest.mark.parametrize("base", ["base.qcow2", "m1.qcow2", "m2.qcow2", None])
def test_every_depth(tmp_path, qemu, top_fmt, base):
    top = deep(tmp_path, qemu, top_fmt)[-1]
    pull_and_judge(tmp_path, qemu, top, base, top_fmt)


def test_intermediate_image_pull(tmp_path, qemu):
    """Pulling an image in the middle of the chain (m3 down to base) keeps what m3 and
    the top above it read."""
    base, m1, m2, m3, top = deep(tmp_path, qemu)
    want_top = tmp_path / "top.raw"
    qemu.to_raw(top, want_top)
    pull_and_judge(tmp_path, qemu, m3, "base.qcow2")
    assert qemu.compare(top, str(want_top), "qcow2", "raw")


def test_copy_on_read_then_partial_pull(tmp_path, qemu):
    base, m1, m2, m3, top = deep(tmp_path, qemu)
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top, copy_on_read=True, backing_format=formats(tmp_path)) as img:
        assert img.read(0, img.size) == want.read_bytes()
    qemu.assert_clean(top)
    assert qemu.compare(top, str(want), "qcow2", "raw")
    pull_and_judge(tmp_path, qemu, top, "base.qcow2")


def test_plan_counts_the_hidden_zeros(tmp_path, qemu):
    """``end`` is the plan: what a layer above the base holds plus what an image above
    the base hides by ending early; a whole pull needs none of the hidden zeros."""
    _, _, top = build(tmp_path, qemu, [
        ("base.qcow2", "qcow2", 16 * M, ["write -P 0x22 0 16M"], ()),
        ("mid.qcow2", "qcow2", 5 * M, ["write -P 0x33 0 1M"], ()),
        ("top.qcow2", "qcow2", 16 * M, [], ()),
    ])
    with blockpull.open(top, readonly=True) as img:
        assert img.read(5 * M - 1, 2) == b"\x22\x00"
    shutil.copy(top, tmp_path / "whole.qcow2")
    assert pull_and_judge(tmp_path, qemu, top, "base.qcow2").end == 1 * M + 11 * M
    assert pull_and_judge(tmp_path, qemu, str(tmp_path / "whole.qcow2"), None).end == 5 * M
