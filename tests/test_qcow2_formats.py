"""qcow2 features QEMU makes: compressed clusters, extended L2 entries, internal
snapshots, dirty/corrupt/autoclear bits. qemu-img is the judge of every result."""
import os
import random
import shutil
import struct
import zlib

import pytest
import zstandard

import blockpull

OFFSET_MASK = 0x00FFFFFFFFFFFE00


def header(path):
    with open(path, "rb") as f:
        h = f.read(112)
    cbits, = struct.unpack(">I", h[20:24])
    l1_off, = struct.unpack(">Q", h[40:48])
    incompat, autoclear = struct.unpack(">Q", h[72:80])[0], struct.unpack(">Q", h[88:96])[0]
    return cbits, l1_off, incompat, autoclear


def l2_slot(path, cluster, extended=False):
    """File offset of the (first 64 bits of the) L2 entry of virtual cluster ``cluster``."""
    cbits, l1_off, _, _ = header(path)
    l2_bits = cbits - (4 if extended else 3)
    with open(path, "rb") as f:
        f.seek(l1_off + 8 * (cluster >> l2_bits))
        l2 = struct.unpack(">Q", f.read(8))[0] & OFFSET_MASK
    assert l2
    return l2 + ((cluster & ((1 << l2_bits) - 1)) << (4 if extended else 3))


def random_writes(img, model, seed, count=40, maxlen=150_000):
    rng = random.Random(seed)
    size = img.size
    for i in range(count):
        off = rng.randrange(size)
        n = min(rng.randrange(1, maxlen), size - off)
        data = rng.randbytes(n)
        img.write(off, data)
        model[off:off + n] = data
        if i % 8 == 0:
            z = rng.randrange(size)
            zn = min(rng.randrange(1, maxlen), size - z)
            img.write_zeroes(z, zn)
            model[z:z + zn] = bytes(zn)


def compressed_image(qemu, tmp_path, ctype, cs, size=4 << 20, name="c.qcow2", extra=""):
    """A qcow2 image made by ``qemu-img convert -c``: patterns (compressed), a hole, and
    random bytes that do not compress (QEMU stores those as plain clusters)."""
    raw = bytearray(size)
    raw[0:1 << 20] = b"\x03" * (1 << 20)
    raw[1536 << 10:1636 << 10] = b"\x05" * (100 << 10)
    raw[3 << 20:(3 << 20) + 700_000] = random.Random(cs).randbytes(700_000)
    src = tmp_path / "src.raw"
    src.write_bytes(raw)
    out = str(tmp_path / name)
    opts = f"cluster_size={cs},compression_type={ctype}" + extra
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), out)
    info = qemu.info(out)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    return out


# ---- compressed clusters -----------------------------------------------------------------

@pytest.mark.parametrize("cs", [4096, 65536, 2 << 20])
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_backing_reads_and_maps(tmp_path, qemu, ctype, cs):
    base = compressed_image(qemu, tmp_path, ctype, cs)
    top = qemu.create(tmp_path / "top.qcow2", 4 << 20, backing="c.qcow2")
    qemu.io(top, "write -P 9 100k 8k", "write -z 3100k 64k")
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, img.size) == qemu.to_raw(top, tmp_path / "top.raw")
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    with blockpull.open(base, readonly=True) as img:
        assert img.read(0, img.size) == qemu.to_raw(base, tmp_path / "c.raw")


@pytest.mark.parametrize("cs", [4096, 65536, 2 << 20])
@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_write_over_compressed_top(tmp_path, qemu, ctype, cs):
    top = compressed_image(qemu, tmp_path, ctype, cs)
    model = bytearray(qemu.to_raw(top, tmp_path / "before.raw"))
    with blockpull.open(top) as img:
        random_writes(img, model, cs, count=25)
        assert img.read(0, img.size) == bytes(model)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(top)  # every replaced compressed cluster's count dropped
    assert qemu.compare(top, tmp_path / "model.raw", "qcow2", "raw")
    # overwriting every cluster leaves no compressed data: nothing leaked
    with blockpull.open(top) as img:
        img.write(0, bytes(range(256)) * (img.size // 256))
    qemu.assert_clean(top)
    assert qemu.info(top)["actual-size"] > 0


def forge_zstd_cluster(path, payload: bytes, cluster: int = 0) -> None:
    """Make virtual cluster ``cluster`` a compressed cluster holding ``payload`` (zstd
    frames and padding), stored at an odd byte offset at the end of the file."""
    cbits = header(path)[0]
    slot = l2_slot(path, cluster)
    size = os.path.getsize(path)
    coff = ((size + 511) & ~511) + 200
    nsect = ((coff & 511) + len(payload) + 511) // 512
    x = 62 - (cbits - 8)
    entry = (1 << 62) | ((nsect - 1) << x) | coff
    with open(path, "r+b") as f:
        f.seek(coff)
        f.write(payload)
        f.truncate((coff & ~511) + nsect * 512)
        f.seek(slot)
        f.write(struct.pack(">Q", entry))


def test_zstd_several_frames_and_padding(tmp_path, qemu):
    p = compressed_image(qemu, tmp_path, "zstd", 65536)
    rng = random.Random(5)
    parts = [rng.randbytes(10000), b"\x42" * 30000, rng.randbytes(25536)]
    z = zstandard.ZstdCompressor()
    # a skippable frame between data frames, junk after the frame that ends the cluster
    skippable = struct.pack("<II", 0x184D2A53, 5) + b"skip!"
    payload = z.compress(parts[0]) + skippable + z.compress(parts[1]) + z.compress(parts[2])
    forge_zstd_cluster(p, payload + rng.randbytes(700), cluster=1)
    want = qemu.to_raw(p, tmp_path / "q.raw")
    assert want[65536:131072] == b"".join(parts)
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, img.size) == want


def test_zlib_cluster_with_a_32k_window_reads_as_qemu_reads_it(tmp_path, qemu):
    # QEMU writes raw deflate with a 4 KiB window, but zlib (QEMU's reader) also decodes a
    # stream whose matches reach further back, as another writer may make: so must we
    p = compressed_image(qemu, tmp_path, "zlib", 65536)
    r = random.Random(8).randbytes(6000)
    plain = (r * 11)[:65536]
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    forge_zstd_cluster(p, co.compress(plain) + co.flush() + b"\xff" * 300, cluster=1)
    want = qemu.to_raw(p, tmp_path / "q.raw")
    assert want[65536:131072] == plain
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, img.size) == want
        # partial reads of one compressed cluster, in and out of order
        for off in (70000, 65536, 131071, 100000, 65536 + 4096):
            assert img.read(off, 1) == want[off:off + 1]
        assert img.read(130000, 4000) == want[130000:134000]


def test_zlib_cluster_that_decodes_short_is_corrupt(tmp_path, qemu):
    p = compressed_image(qemu, tmp_path, "zlib", 65536)
    co = zlib.compressobj(6, zlib.DEFLATED, -12)
    forge_zstd_cluster(p, co.compress(b"\7" * 60000) + co.flush(), cluster=1)
    r = qemu.run("qemu-io", "-c", "read 64k 64k", p, check=False)
    assert "error" in (r.stdout + r.stderr).lower()
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, 65536) == b"\3" * 65536
        with pytest.raises(blockpull.ImageFormatError, match="decompresses to 60000 bytes"):
            img.read(65536, 65536)
        with pytest.raises(blockpull.ImageFormatError, match="decompresses to 60000 bytes"):
            img.read(65536 + 512, 512)


def test_zstd_frame_past_cluster_end_is_corrupt(tmp_path, qemu):
    p = compressed_image(qemu, tmp_path, "zstd", 65536)
    z = zstandard.ZstdCompressor()
    forge_zstd_cluster(p, z.compress(b"\1" * 32768) + z.compress(b"\2" * 32769), cluster=1)
    r = qemu.run("qemu-io", "-c", "read 64k 64k", p, check=False)
    assert "error" in (r.stdout + r.stderr).lower()
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, 65536) == b"\3" * 65536
        with pytest.raises(blockpull.ImageFormatError, match="c.qcow2"):
            img.read(65536, 512)


# ---- extended L2 entries -----------------------------------------------------------------

def ext_chain(qemu, tmp_path, cs, base_ext):
    size = 4 << 20
    bopts = [f"cluster_size={cs}" + (",extended_l2=on" if base_ext else "")]
    base = qemu.create(tmp_path / "base.qcow2", size, opts=bopts)
    qemu.io(base, "write -P 1 0 3M", "write -z 1M 100k")
    top = qemu.create(tmp_path / "top.qcow2", size, backing="base.qcow2",
                      opts=[f"cluster_size={cs},extended_l2=on"])
    rng = random.Random(cs)
    sc = cs // 32
    cmds = []
    for i in range(40):
        off = rng.randrange(size // sc) * sc + rng.choice([0, 0, 512, sc // 2])
        n = rng.choice([512, sc, 3 * sc, sc + 512, cs, 2 * cs + sc])
        n = min(n, size - off)
        if i % 4 == 3:
            cmds.append(f"write -z {off} {n}")
        else:
            cmds.append(f"write -P {i + 10} {off} {n}")
    qemu.io(top, *cmds)
    return top, base


@pytest.mark.parametrize("cs", [16384, 65536, 2 << 20])
@pytest.mark.parametrize("base_ext", [True, False])
def test_extended_l2_reads_and_maps(tmp_path, qemu, cs, base_ext):
    top, base = ext_chain(qemu, tmp_path, cs, base_ext)
    assert qemu.info(top)["format-specific"]["data"]["extended-l2"] is True
    with blockpull.open(top, readonly=True) as img:
        assert img.read(0, img.size) == qemu.to_raw(top, tmp_path / "t.raw")
        assert [e.to_json() for e in img.map()] == qemu.map(top)
    with blockpull.open(base, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(base)


def test_extended_l2_compressed(tmp_path, qemu):
    p = compressed_image(qemu, tmp_path, "zlib", 65536, extra=",extended_l2=on")
    qemu.io(p, "write -P 8 4k 2k", "write -z 1M 8k")
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, img.size) == qemu.to_raw(p, tmp_path / "p.raw")
        assert [e.to_json() for e in img.map()] == qemu.map(p)


def test_extended_l2_opens_writable(tmp_path, qemu):
    # writes, pulls and checks of extended L2 images: tests/test_extl2.py
    top, base = ext_chain(qemu, tmp_path, 65536, True)
    want = qemu.to_raw(top, tmp_path / "want.raw")
    with blockpull.open(top) as img:
        assert img.read(0, img.size) == want
    qemu.assert_clean(top)
    assert qemu.to_raw(top, tmp_path / "after.raw") == want


def test_extended_l2_invalid_bitmap(tmp_path, qemu):
    p = qemu.create(tmp_path / "e.qcow2", 1 << 20, opts=["extended_l2=on"])
    qemu.io(p, "write -P 1 0 4k")
    slot = l2_slot(p, 0, extended=True)
    with open(p, "r+b") as f:
        f.seek(slot + 8)
        bm = struct.unpack(">Q", f.read(8))[0]
        f.seek(slot + 8)
        f.write(struct.pack(">Q", bm | (1 << 32)))  # subcluster 0 allocated and zero
    r = qemu.run("qemu-io", "-c", "read 0 4k", p, check=False)
    assert "error" in (r.stdout + r.stderr).lower()
    with blockpull.open(p, readonly=True) as img:
        with pytest.raises(blockpull.ImageFormatError, match="e.qcow2"):
            img.read(0, 4096)


def test_preallocated_zero_clusters_map(tmp_path, qemu):
    p = qemu.create(tmp_path / "z.qcow2", 1 << 20)
    qemu.io(p, "write -P 1 0 512k", "write -z 64k 128k", "write -z -u 256k 64k")
    with blockpull.open(p, readonly=True) as img:
        assert [e.to_json() for e in img.map()] == qemu.map(p)
        assert img.read(0, img.size) == qemu.to_raw(p, tmp_path / "z.raw")


# ---- internal snapshots -----------------------------------------------------------------

def raw_of(qemu, path, tmp_path):
    return qemu.to_raw(path, tmp_path / "snap.raw")


@pytest.mark.parametrize("variant", [
    "compat=1.1,cluster_size=512", "compat=1.1,cluster_size=65536",
    "compat=0.10,cluster_size=4096", "compat=0.10,cluster_size=65536",
    "compat=1.1,cluster_size=4096,refcount_bits=8",
    "compat=1.1,cluster_size=65536,refcount_bits=64", "compressed", "backed"])
def test_snapshots_survive_writes(tmp_path, qemu, variant):
    size = 4 << 20
    if variant == "compressed":
        p = compressed_image(qemu, tmp_path, "zstd", 65536, name="t.qcow2")
    else:
        opts = variant if variant != "backed" else "cluster_size=65536"
        backing = None
        if variant == "backed":
            b = qemu.create(tmp_path / "b.qcow2", size)
            qemu.io(b, "write -P 1 0 4M")
            backing = "b.qcow2"
        p = qemu.create(tmp_path / "t.qcow2", size, backing=backing, opts=[opts])
        qemu.io(p, "write -P 2 0 1M", "write -P 3 2M 512k")
    qemu.img("snapshot", "-c", "s1", p)
    snaps = {"s1": raw_of(qemu, p, tmp_path)}
    qemu.io(p, "write -P 4 512k 1M", "write -P 0 3M 64k")
    qemu.img("snapshot", "-c", "s2", p)
    snaps["s2"] = raw_of(qemu, p, tmp_path)
    model = bytearray(snaps["s2"])
    with blockpull.open(p) as img:
        random_writes(img, model, hash(variant) & 0xFFFF, count=50, maxlen=200_000)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(p)
    assert qemu.compare(p, tmp_path / "model.raw", "qcow2", "raw")
    for name, want in snaps.items():
        c = str(tmp_path / "copy.qcow2")
        shutil.copyfile(p, c)
        qemu.img("snapshot", "-a", name, c)
        assert raw_of(qemu, c, tmp_path) == want, name
        qemu.assert_clean(c)
    # writing again after reopening finds the COPIED flags right
    with blockpull.open(p) as img:
        img.write(0, b"\x99" * 300_000)
        model[0:300_000] = b"\x99" * 300_000
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(p)
    assert qemu.compare(p, tmp_path / "model.raw", "qcow2", "raw")
    qemu.img("snapshot", "-a", "s1", p)
    assert raw_of(qemu, p, tmp_path) == snaps["s1"]


# ---- feature bits -------------------------------------------------------------------------

# a dirty image (bit 0) is repaired on a writable open, as QEMU does: tests/test_repair_open.py
@pytest.mark.parametrize("bit,word", [(1, "corrupt")])
def test_dirty_and_corrupt_refuse_writes(tmp_path, qemu, bit, word):
    p = qemu.create(tmp_path / "d.qcow2", 1 << 20)
    qemu.io(p, "write -P 6 0 64k")
    with open(p, "r+b") as f:
        f.seek(72)
        inc = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", inc | (1 << bit)))
    before = open(p, "rb").read()
    with pytest.raises(blockpull.ImageFormatError) as ei:
        blockpull.open(p)
    msg = str(ei.value)
    assert word in msg and "d.qcow2" in msg and "qemu-img check -r all" in msg
    assert "read-only" in msg
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, 65536) == b"\x06" * 65536
    assert open(p, "rb").read() == before


def test_unknown_autoclear_bits_cleared_bitmap_bit_kept(tmp_path, qemu):
    """A writer clears the autoclear bits it does not maintain before its first change;
    bit 0 (persistent bitmaps) it maintains, so the bit and the bitmaps stay."""
    p = qemu.create(tmp_path / "bm.qcow2", 4 << 20)
    qemu.img("bitmap", "--add", p, "b0")
    qemu.io(p, "write -P 1 0 1M")
    with open(p, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1 | 1 << 40))
    with blockpull.open(p, readonly=True) as img:
        img.read(0, 4096)
    with blockpull.open(p):
        pass
    assert header(p)[3] == 1 | 1 << 40, "the bits are cleared only by a change"
    with blockpull.open(p) as img:
        img.write(4096, b"\x07" * 8192)
        assert header(p)[3] == 1
    qemu.assert_clean(p)
    bitmaps = qemu.info(p)["format-specific"]["data"]["bitmaps"]
    assert [(b["name"], b["flags"]) for b in bitmaps] == [("b0", ["auto"])]
    assert "inconsistent" not in qemu.img("info", p).stderr
    want = bytearray(b"\x01" * (1 << 20) + bytes(3 << 20))
    want[4096:4096 + 8192] = b"\x07" * 8192
    assert qemu.to_raw(p, tmp_path / "bm.raw") == bytes(want)
    qemu.img("bitmap", "--add", p, "b1")
    qemu.assert_clean(p)
