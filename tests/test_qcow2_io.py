"""qcow2 reads, writes and maps, judged by qemu-img."""
import os
import random

import pytest

import blockpull


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_random_unaligned_writes_match_model(tmp_path, qemu, cluster_size, compat):
    size = 6 << 20
    base = qemu.create(tmp_path / "base.qcow2", size, opts=[f"cluster_size={cluster_size},compat={compat}"])
    qemu.io(base, "write -P 9 100k 2M", "write -P 8 4M 1M")
    model = bytearray(qemu.to_raw(base, tmp_path / "base.raw"))
    top = str(tmp_path / "top.qcow2")
    blockpull.create(top, size, backing="base.qcow2", backing_format="qcow2",
                     cluster_size=cluster_size, compat=compat)
    rng = random.Random(cluster_size)
    with blockpull.open(top) as img:
        for i in range(120):
            off = rng.randrange(size)
            n = min(rng.randrange(1, 150_000), size - off)
            data = rng.randbytes(n)
            img.write(off, data)
            model[off:off + n] = data
            if i % 17 == 0:
                z = rng.randrange(size // 2)
                zn = rng.randrange(1, 200_000)
                img.write_zeroes(z, zn)
                model[z:z + zn] = bytes(zn)
        assert img.read(0, size) == bytes(model)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(top)
    assert qemu.compare(top, tmp_path / "model.raw", "qcow2", "raw")


def test_chain_reads_match_qemu_convert(tmp_path, qemu, chain3):
    top, mid, base = chain3
    want = qemu.to_raw(top, tmp_path / "want.raw")
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, img.size) == want
        buf = bytearray(img.size)
        assert img.readinto(0, buf) == img.size
        assert bytes(buf) == want
        assert [c.format for c in img.chain] == ["qcow2"] * 3
        assert img.backing == mid


def test_map_matches_qemu(tmp_path, qemu, chain3):
    top, _, _ = chain3
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)


def test_map_top_larger_than_backing(tmp_path, qemu):
    base = qemu.create(tmp_path / "b.qcow2", 1 << 20)
    qemu.io(base, "write -P 1 0 64k", "write -z 128k 64k")
    top = qemu.create(tmp_path / "t.qcow2", 3 << 20, backing="b.qcow2")
    qemu.io(top, "write -P 2 2M 4k")
    with blockpull.open(top, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(top)
        assert img.read(0, img.size) == qemu.to_raw(top, tmp_path / "t.raw")


def test_raw_backing(tmp_path, qemu):
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(2 << 20)
        f.seek(65536)
        f.write(b"\x55" * 70000)
    top = qemu.create(tmp_path / "t.qcow2", 2 << 20, backing="base.raw", backing_fmt="raw")
    with blockpull.open(top) as img:
        img.write(60000, b"\xaa" * 10000)
        want = bytearray(raw.read_bytes())
        want[60000:70000] = b"\xaa" * 10000
        assert img.read(0, img.size) == bytes(want)
    qemu.assert_clean(top)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_created_images_pass_check(tmp_path, qemu, compat):
    for cs in (512, 65536, 2 << 20):
        p = str(tmp_path / f"c{cs}.qcow2")
        blockpull.create(p, 1 << 30, cluster_size=cs, compat=compat)
        qemu.assert_clean(p)
        info = qemu.info(p)
        assert info["virtual-size"] == 1 << 30
        assert info["cluster-size"] == cs
        assert info["format-specific"]["data"]["compat"] == compat


def test_create_with_backing_records_format(tmp_path, qemu):
    base = qemu.create(tmp_path / "b.qcow2", 1 << 20)
    top = str(tmp_path / "t.qcow2")
    blockpull.create(top, 0, backing="b.qcow2")
    info = qemu.info(top)
    assert info["backing-filename"] == "b.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 1 << 20


def test_write_then_reopen_and_qemu_reads(tmp_path, qemu):
    p = str(tmp_path / "a.qcow2")
    blockpull.create(p, 1 << 20)
    with blockpull.open(p) as img:
        img.write(1000, b"hello")
    r = qemu.run("qemu-io", "-c", "read -P 0x68 1000 1", p)
    assert "read 1/1" in r.stdout
    with blockpull.open(p, readonly=True) as img:
        assert img.read(998, 9) == b"\0\0hello\0\0"


class TestBadInput:
    def test_missing_file(self, tmp_path):
        with pytest.raises(blockpull.BlockpullError) as ei:
            blockpull.open(tmp_path / "nope.qcow2")
        assert "nope.qcow2" in str(ei.value)

    def test_not_an_image(self, tmp_path):
        p = tmp_path / "junk.qcow2"
        p.write_bytes(os.urandom(4096))
        with pytest.raises(blockpull.ImageFormatError) as ei:
            blockpull.open(p)
        assert "junk.qcow2" in str(ei.value)

    def test_truncated_header(self, tmp_path, qemu):
        p = qemu.create(tmp_path / "t.qcow2", 1 << 20)
        with open(p, "r+b") as f:
            f.truncate(50)
        with pytest.raises(blockpull.ImageFormatError) as ei:
            blockpull.open(p)
        assert "t.qcow2" in str(ei.value)

    def test_missing_backing(self, tmp_path, qemu):
        base = qemu.create(tmp_path / "b.qcow2", 1 << 20)
        top = qemu.create(tmp_path / "t.qcow2", 1 << 20, backing="b.qcow2")
        os.unlink(base)
        with pytest.raises(blockpull.BackingChainError) as ei:
            blockpull.open(top)
        assert "b.qcow2" in str(ei.value)

    def test_unrecorded_backing_format_is_not_guessed(self, tmp_path, qemu):
        base = qemu.create(tmp_path / "b.qcow2", 1 << 20)
        top = str(tmp_path / "t.qcow2")
        blockpull.create(top, 1 << 20, backing="b.qcow2", backing_format="qcow2")
        # strip the recorded format with qemu-img rebase -u (no -F)
        qemu.run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", top)
        with open(top, "r+b") as f:
            data = bytearray(f.read(65536))
            i = data.find(b"\xe2\x79\x2a\xca")
            assert i > 0
            data[i:i + 4] = b"\x00\x00\x00\x00"  # turn the format extension into the end marker
            f.seek(0)
            f.write(data)
        with pytest.raises(blockpull.BackingChainError, match="backing_format"):
            blockpull.open(top)
        with blockpull.open(top, backing_format="qcow2", readonly=True) as img:
            assert img.chain[1].format == "qcow2"
