"""The fuzz loop, run in its own process so that a crash cannot take pytest down with it.

``python fuzz_child.py SEED_DIR OUT_DIR EXAMPLES SEED``: every ``*.qcow2`` in SEED_DIR is
a real image; hypothesis mutates bytes of its header cluster, L1 and L2 tables, refcount
table and blocks, snapshot table and compressed data, and each mutant is opened, mapped,
read whole (virtual size bounded by the seeds' own tables) and checked. Anything but
success or ImageFormatError/BackingChainError is a failure. The image under test is
always in OUT_DIR/current.qcow2 first, so a crash or a hang leaves the input behind; a
failing input is also copied to OUT_DIR/failing.qcow2. Prints one JSON summary line.
"""
import json
import os
import resource
import shutil
import struct
import sys
import time

LIMIT = 2 << 30
resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import blockpull  # noqa: E402

MASK = 0x00FFFFFFFFFFFE00
READ_LIMIT = 8 << 20          # bytes of virtual disk read per mutant
ALLOWED = (blockpull.ImageFormatError, blockpull.BackingChainError)


def bitmap_regions(data, version):
    """The bitmap directory and the first bitmap table, if the image has bitmaps."""
    if version != 3:
        return []
    off = struct.unpack_from(">I", data, 100)[0]
    while off + 8 <= min(len(data), 4096):
        etype, elen = struct.unpack_from(">II", data, off)
        if etype == 0:
            break
        if etype == 0x23852875 and elen == 24:
            _nb, _r, dsize, doff = struct.unpack_from(">IIQQ", data, off + 8)
            toff, tsize = struct.unpack_from(">QI", data, doff)
            return [("bitmap_dir", doff, dsize), ("bitmap_table", toff, tsize * 8)]
        off += 8 + ((elen + 7) & ~7)
    return []


def regions(path):
    """(name, file offset, length) of the metadata worth mutating in one image."""
    with open(path, "rb") as f:
        data = f.read()
    (version, _bfo, _bfs, cbits, _size, _crypt, l1_size, l1_off, rt_off, rt_cl, nb_snap,
     snap_off) = struct.unpack_from(">IQIIQIIQQIIQ", data, 4)
    cs = 1 << cbits
    out = [("header", 0, 112), ("header_cluster", 0, min(cs, 4096))]
    if l1_size:
        out.append(("l1", l1_off, l1_size * 8))
    l2s = []
    for i in range(l1_size):
        e = struct.unpack_from(">Q", data, l1_off + 8 * i)[0] & MASK
        if e and e + cs <= len(data):
            l2s.append(e)
    for e in l2s[:4]:
        out.append(("l2", e, cs))
        for j in range(cs // 8):
            x = struct.unpack_from(">Q", data, e + 8 * j)[0]
            if x & (1 << 62):
                coff = x & ((1 << (62 - (cbits - 8))) - 1)
                out.append(("compressed", coff, min(256, len(data) - coff)))
                break
    out.append(("reftable", rt_off, min(rt_cl * cs, 512)))
    rb = struct.unpack_from(">Q", data, rt_off)[0]
    if rb:
        out.append(("refblock", rb, min(cs, 512)))
    if nb_snap:
        out.append(("snapshots", snap_off, min(256, len(data) - snap_off)))
    out += bitmap_regions(data, version)
    return [r for r in out if r[1] + r[2] <= len(data) and r[2] > 0]


def load_seeds(seed_dir):
    seeds = []
    for name in sorted(os.listdir(seed_dir)):
        if name.endswith(".qcow2"):
            p = os.path.join(seed_dir, name)
            with open(p, "rb") as f:
                seeds.append((name, f.read(), regions(p)))
    return seeds


def exercise(path):
    """Open, map, read and check; True if it opened, False for a named error."""
    try:
        with blockpull.open(path, readonly=True, backing_format="raw") as img:
            img.map()
            pos, end = 0, min(img.size, READ_LIMIT)
            while pos < end:
                n = min(1 << 20, end - pos)
                img.read(pos, n)
                pos += n
        opened = True
    except ALLOWED:
        opened = False
    try:
        blockpull.check(path)
    except ALLOWED:
        pass
    return opened


def main(seed_dir, out_dir, examples, rng_seed):
    seeds = load_seeds(seed_dir)
    cur = os.path.join(out_dir, "current.qcow2")
    stats = {"examples": 0, "opened": 0, "refused": 0}
    interesting = [0, 1, 0x200, 0x10000, 1 << 62, 1 << 63, (1 << 63) | 0x10000, (1 << 64) - 1,
                   0xFFFFFFFF, 0x7FFFFFFF, 1 << 40]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @seed(rng_seed)
    @given(st.data())
    def fuzz(data):
        name, blob, regs = data.draw(st.sampled_from(seeds), label="seed image")
        img = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4), label="mutations")):
            rname, roff, rlen = data.draw(st.sampled_from(regs), label="region")
            pos = roff + data.draw(st.integers(0, rlen - 1), label="pos")
            how = data.draw(st.sampled_from(["bit", "byte", "u32", "u64"]), label="how")
            if how == "bit":
                img[pos] ^= 1 << data.draw(st.integers(0, 7))
            elif how == "byte":
                img[pos] = data.draw(st.integers(0, 255))
            else:
                width = 4 if how == "u32" else 8
                pos = max(roff, pos & ~(width - 1))
                if pos + width > len(img):
                    continue
                v = data.draw(st.one_of(st.sampled_from(interesting),
                                        st.integers(0, len(img) + 0x20000),
                                        st.integers(0, (1 << (8 * width)) - 1)))
                img[pos:pos + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        with open(cur, "wb") as f:
            f.write(img)
        stats["examples"] += 1
        try:
            if exercise(cur):
                stats["opened"] += 1
            else:
                stats["refused"] += 1
        except BaseException:
            shutil.copy(cur, os.path.join(out_dir, "failing.qcow2"))
            raise

    t0 = time.monotonic()
    try:
        fuzz()
    except BaseException:
        print(f"fuzz failed with seed {rng_seed}; input saved in "
              f"{os.path.join(out_dir, 'failing.qcow2')}", file=sys.stderr)
        raise
    stats["seconds"] = round(time.monotonic() - t0, 1)
    stats["seed"] = rng_seed
    print(json.dumps(stats))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
