"""Backing names resolved as the kernel resolves them, as QEMU does.

A relative backing name is joined to the directory of the image that names it and handed
to the kernel as is: across a symlinked directory ``L/../x`` is not ``x``. Files are
identified by device and inode. Judged by qemu-img compare, check and info.
"""
import os
import subprocess
import sys

import pytest

import blockpull
from blockpull.errors import BackingChainError
from relhelp import child_env

MiB = 1 << 20


@pytest.fixture
def tree(tmp_path, qemu):
    """d/real/base.qcow2 (0x11) and a decoy d/base.qcow2 (0xee, twice as large), the
    symlink d/L -> real/deep, and d/real/deep/top.qcow2 backed by "../base.qcow2".
    Opened as d/L/top.qcow2, QEMU reads 0x11."""
    d = tmp_path / "d"
    (d / "real" / "deep").mkdir(parents=True)
    os.symlink("real/deep", d / "L")
    qemu.create(d / "real" / "base.qcow2", MiB)
    qemu.io(str(d / "real" / "base.qcow2"), "write -P 0x11 0 1M")
    qemu.create(d / "base.qcow2", 2 * MiB)
    qemu.io(str(d / "base.qcow2"), "write -P 0xee 0 2M")
    top = qemu.create(d / "real" / "deep" / "top.qcow2", MiB, backing="../base.qcow2")
    return d


def test_backing_through_symlinked_directory(tmp_path, qemu, tree):
    top = str(tree / "L" / "top.qcow2")
    want = tmp_path / "want.raw"
    assert qemu.to_raw(top, want) == b"\x11" * MiB      # what QEMU reads
    with blockpull.open(top) as img:
        assert os.path.samefile(img.backing, tree / "real" / "base.qcow2")
        assert img.chain[1].size == MiB
        assert img.read(0, MiB) == b"\x11" * MiB
        assert img.pull().result(timeout=30).status == "completed"
    qemu.assert_clean(top)
    assert qemu.compare(want, top, "raw", "qcow2")
    assert "backing-filename" not in qemu.info(top)


def test_top_path_with_dotdot_after_symlink(tmp_path, qemu, tree):
    # d/L/.. is d/real, so d/L/../deep/top.qcow2 is the top; as text it would be d/deep
    top = str(tree / "L" / ".." / "deep" / "top.qcow2")
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, MiB) == b"\x11" * MiB
    r = subprocess.run([sys.executable, "-m", "blockpull", "pull", top],
                       capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert qemu.compare(top, str(tree / "real" / "base.qcow2"), "qcow2", "qcow2")


def test_create_resolves_backing_through_symlink(qemu, tree):
    new = tree / "L" / "new.qcow2"
    blockpull.create(str(new), 0, backing="../base.qcow2")
    info = qemu.info(str(new))
    assert info["virtual-size"] == MiB                  # the real base, not the decoy
    assert info["backing-filename"] == "../base.qcow2"
    assert qemu.compare(str(new), str(tree / "real" / "base.qcow2"))


@pytest.fixture
def chain_via_link(qemu, tree):
    """d/top.qcow2 -> "L/mid.qcow2" (d/real/deep/mid.qcow2) -> "../base.qcow2", which
    from d/L is d/real/base.qcow2. Returns (top, want.raw)."""
    mid = qemu.create(tree / "real" / "deep" / "mid.qcow2", MiB, backing="../base.qcow2")
    qemu.io(mid, "write -P 0x22 64k 64k")
    top = qemu.create(tree / "top.qcow2", MiB, backing="L/mid.qcow2")
    qemu.io(top, "write -P 0x33 256k 4k")
    want = tree.parent / "want.raw"
    data = qemu.to_raw(top, want)
    assert data[:4] == b"\x11" * 4 and data[64 << 10] == 0x22 and data[256 << 10] == 0x33
    return top, want


def _spellings(tree):
    real = tree / "real" / "base.qcow2"
    os.symlink("real/base.qcow2", tree / "baselink.qcow2")
    return [str(real), str(tree / "L" / ".." / "base.qcow2"), str(tree / "baselink.qcow2"),
            "../base.qcow2", os.path.relpath(real)]


@pytest.mark.parametrize("which", range(5))
def test_partial_pull_keeps_base_by_any_spelling(qemu, tree, chain_via_link, which):
    top, want = chain_via_link
    base = _spellings(tree)[which]
    with blockpull.open(top) as img:
        assert img.base_depth(base) == 2
        info = img.pull(base=base).result(timeout=30)
        assert info.status == "completed"
        assert img.read(0, MiB) == want.read_bytes()
    qemu.assert_clean(top)
    assert qemu.compare(want, top, "raw", "qcow2")
    info = qemu.info(top)
    # named relative to the top's directory as the chain named it, not collapsed as text
    assert info["backing-filename"] == "L/../base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert os.stat(tree / info["backing-filename"]).st_ino == \
        os.stat(tree / "real" / "base.qcow2").st_ino
    with blockpull.open(top, readonly=True) as img:
        assert len(img.chain) == 2 and os.path.samefile(img.backing, tree / "real" / "base.qcow2")


def test_base_that_is_not_in_the_chain_is_refused(qemu, tree, chain_via_link):
    top, want = chain_via_link
    before = open(top, "rb").read()
    with blockpull.open(top) as img:
        # as text, d/L/../base.qcow2 would be this decoy
        for base in (str(tree / "base.qcow2"), str(tree / "nothing.qcow2")):
            with pytest.raises(BackingChainError):
                img.pull(base=base)
    assert open(top, "rb").read() == before


def test_base_name_that_reaches_another_file_from_here_is_ambiguous(qemu, tree,
                                                                    chain_via_link,
                                                                    monkeypatch):
    top, want = chain_via_link
    monkeypatch.chdir(tree / "real")     # from here "../base.qcow2" is the decoy
    with blockpull.open(top) as img:
        with pytest.raises(BackingChainError, match="ambiguous"):
            img.base_depth("../base.qcow2")
        assert img.base_depth("L/mid.qcow2") == 1


def test_absolute_kept_name_stays_absolute(qemu, tree):
    base = str(tree / "L" / ".." / "base.qcow2")
    mid = qemu.create(tree / "real" / "deep" / "mid.qcow2", MiB, backing=base)
    top = qemu.create(tree / "top.qcow2", MiB, backing="L/mid.qcow2")
    with blockpull.open(top) as img:
        assert img.pull(base=str(tree / "real" / "base.qcow2")).result(timeout=30).status \
            == "completed"
    assert qemu.info(top)["backing-filename"] == base
    assert qemu.compare(top, str(tree / "real" / "base.qcow2"))


def test_loop_spelt_through_a_symlink_is_found(qemu, tree):
    a = qemu.create(tree / "a.qcow2", MiB)
    qemu.create(tree / "real" / "deep" / "b.qcow2", MiB, backing="../../a.qcow2")
    qemu.img("rebase", "-u", "-f", "qcow2", "-b", "L/b.qcow2", "-F", "qcow2", a)
    with pytest.raises(BackingChainError, match="loops"):
        blockpull.open(a)


def test_backing_format_named_by_any_spelling(tmp_path, qemu, tree):
    """QED records no format for a qcow2 backing: a format the caller names wins over the
    probe, keyed by any path to the file; a key that is the text-collapsed spelling (the
    decoy) names nothing, and the probe (qcow2 magic) decides."""
    qemu.create(tree / "real" / "deep" / "top.qed", MiB, fmt="qed", backing="../base.qcow2")
    top = str(tree / "L" / "top.qed")
    with blockpull.open(top, readonly=True,
                        backing_format={str(tree / "real" / "base.qcow2"): "raw"}) as img:
        assert img.chain[1].format == "raw"
    with blockpull.open(top, readonly=True,
                        backing_format={str(tree / "base.qcow2"): "raw"}) as img:
        assert img.chain[1].format == "qcow2"
        assert img.read(0, MiB) == b"\x11" * MiB
