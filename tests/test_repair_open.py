"""Repair on a writable open, as QEMU does it: a qcow2 image left dirty by a writer with
lazy refcounts gets its refcounts rebuilt, a QED image with the need-check bit gets its
invalid table entries cleared, each made durable before the bit is cleared; read-only
opens change nothing. qemu-img is the judge: ``check`` clean afterwards, ``compare``
equal to what the image read before (and to what ``qemu-img check -r all`` makes of it),
``info`` without the bit."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys

import pytest

import blockpull
from blockpull import _qed, repair

KiB = 1024
MiB = 1024 * KiB
LOG = "blockpull"


def abort_after(path, *cmds, fmt=None):
    """Run qemu-io commands on ``path``, then its ``abort`` command: the writer dies
    (SIGABRT) with whatever it had not written back still in memory."""
    args = ["qemu-io"] + (["-f", fmt] if fmt else [])
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + ["-c", "abort", str(path)], capture_output=True, text=True)
    assert r.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT), (r.returncode, r.stderr)
    assert "error" not in r.stdout.lower(), r.stdout


def kill_after(path, *cmds):
    """Run qemu-io interactively on ``path``, wait until each write command reported,
    then SIGKILL it."""
    p = subprocess.Popen(["qemu-io", str(path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for c in cmds:
            p.stdin.write(c + "\n")
            p.stdin.flush()
            line = p.stdout.readline()
            while "wrote" not in line:
                assert line, f"qemu-io ended before {c!r} was done: {p.stderr.read()}"
                line = p.stdout.readline()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL


def incompat(path):
    with open(path, "rb") as f:
        f.seek(72)
        return struct.unpack(">Q", f.read(8))[0]


def qed_features(path):
    with open(path, "rb") as f:
        f.seek(16)
        return struct.unpack("<Q", f.read(8))[0]


def read_only_raw(path, out, **kw):
    """What a read-only blockpull open reads (no repair), saved as a raw file; the file
    itself must not change."""
    before = open(path, "rb").read()
    with blockpull.open(path, readonly=True, **kw) as img:
        data = img.read(0, img.size)
    assert open(path, "rb").read() == before, "a read-only open changed the file"
    with open(out, "wb") as f:
        f.write(data)
    return data


def oracle(qemu, path, tmp_path):
    """A copy of ``path`` repaired by ``qemu-img check -r all``."""
    o = str(tmp_path / ("oracle" + os.path.splitext(str(path))[1]))
    shutil.copy(path, o)
    r = qemu.img("check", "-r", "all", o, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr     # QED cannot give leaks back
    return o


def repair_lines(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == LOG and r.levelno == logging.INFO and "repaired on open" in r.getMessage()]


def assert_repaired_qcow2(qemu, p, tmp_path, caplog, **kw):
    """``p`` is dirty: a writable open repairs it; judged by qemu-img."""
    assert incompat(p) & 1
    assert qemu.check(p) == 2            # stale refcounts are errors to qemu-img check
    read_only_raw(p, tmp_path / "before.raw", **kw)
    want = oracle(qemu, p, tmp_path)
    caplog.set_level(logging.INFO, logger=LOG)
    with blockpull.open(p, **kw) as img:
        pass
    lines = repair_lines(caplog)
    assert len(lines) == 1 and os.path.basename(p) in lines[0], lines
    assert "dirty bit cleared" in lines[0]
    assert incompat(p) & 1 == 0
    assert qemu.info(p).get("dirty-flag") is False
    qemu.assert_clean(p)
    assert qemu.compare(p, tmp_path / "before.raw", "qcow2", "raw")
    assert qemu.compare(p, want)
    return lines[0]


# ---- qcow2 left dirty ---------------------------------------------------------------------

CASES = {
    "plain": ([], [], ["write -P 1 0 64k", "write -P 2 1M 128k"]),
    "snapshot": ([], ["write -P 3 0 256k", ("snapshot", "-c", "s1")],
                 ["write -P 1 0 64k", "write -P 2 1M 128k", "discard 128k 64k"]),
    # an overwritten compressed cluster: its host cluster's count is dropped lazily
    "compressed": ([], ["write -c -P 4 0 64k", "write -c -P 4 64k 64k", "write -c -P 6 128k 64k"],
                   ["write -P 1 0 4k", "write -P 2 1M 128k"]),
    "refcount_bits_1": (["refcount_bits=1", "cluster_size=4096"], [],
                        ["write -P 1 0 64k", "write -P 2 1M 128k"]),
    "c512_refcount_bits_64": (["refcount_bits=64", "cluster_size=512"], [],
                              ["write -P 1 0 64k", "write -P 2 1M 128k"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_lazy_refcounts_dirty_repaired_on_writable_open(tmp_path, qemu, caplog, name):
    opts, pre, cmds = CASES[name]
    p = qemu.create(tmp_path / "d.qcow2", 8 * MiB, opts=["lazy_refcounts=on"] + opts)
    for c in pre:
        if isinstance(c, tuple):
            qemu.img(c[0], *c[1:], p)
        else:
            qemu.io(p, c)
    abort_after(p, *cmds)
    if name == "snapshot":
        qemu.img("convert", "-U", "-l", "snapshot.name=s1", "-O", "raw", p,
                 str(tmp_path / "s1.before"))
    assert_repaired_qcow2(qemu, p, tmp_path, caplog)
    assert incompat(p) == 0 and qemu.info(p)["format-specific"]["data"]["lazy-refcounts"]
    if name == "snapshot":
        qemu.img("convert", "-l", "snapshot.name=s1", "-O", "raw", p, str(tmp_path / "s1.after"))
        assert open(tmp_path / "s1.after", "rb").read() == open(tmp_path / "s1.before", "rb").read()
    # and it is written to as any image: the repaired counts hold
    model = bytearray(open(tmp_path / "before.raw", "rb").read())
    with blockpull.open(p) as img:
        img.write(100 * KiB, b"\x77" * 300 * KiB)
        img.write_zeroes(2 * MiB, 64 * KiB)
    model[100 * KiB:400 * KiB] = b"\x77" * 300 * KiB
    model[2 * MiB:2 * MiB + 64 * KiB] = bytes(64 * KiB)
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(p)
    assert qemu.compare(p, tmp_path / "model.raw", "qcow2", "raw")


def test_dirty_after_sigkill_repaired_by_a_pull(tmp_path, qemu, caplog):
    """A lazy-refcount top over a backing, its writer SIGKILLed; a pull opens it writable:
    the repair comes first, then the pull, and the result is what the chain read."""
    base = qemu.create(tmp_path / "base.qcow2", 4 * MiB)
    qemu.io(base, "write -P 9 0 4M")
    top = qemu.create(tmp_path / "top.qcow2", 4 * MiB, backing="base.qcow2",
                      opts=["lazy_refcounts=on"])
    kill_after(top, "write -P 1 64k 100k", "write -P 2 3M 8k", "write -z 1M 64k")
    assert incompat(top) & 1
    read_only_raw(top, tmp_path / "before.raw")
    caplog.set_level(logging.INFO, logger=LOG)
    with blockpull.open(top) as img:
        img.pull().result(timeout=60)
    assert len(repair_lines(caplog)) == 1
    info = qemu.info(top)
    assert "backing-filename" not in info and info.get("dirty-flag") is False
    qemu.assert_clean(top)
    assert qemu.compare(top, tmp_path / "before.raw", "qcow2", "raw")


def test_dirty_bit_alone_is_repaired(tmp_path, qemu, caplog):
    """The dirty bit on an image without lazy refcounts (a byte edit): QEMU repairs it
    all the same (nothing to fix); so does blockpull, and the image then takes writes."""
    p = qemu.create(tmp_path / "d.qcow2", 1 * MiB)
    qemu.io(p, "write -P 6 0 64k")
    with open(p, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 1))
    caplog.set_level(logging.INFO, logger=LOG)
    with blockpull.open(p) as img:
        img.write(0, b"ok")
        assert img.read(0, 4) == b"ok\x06\x06"
    line, = repair_lines(caplog)
    assert "0 refcounts raised, 0 lowered" in line
    assert incompat(p) == 0
    qemu.assert_clean(p)


def test_dirty_and_corrupt_still_refused(tmp_path, qemu):
    p = qemu.create(tmp_path / "d.qcow2", 1 * MiB, opts=["lazy_refcounts=on"])
    abort_after(p, "write -P 6 0 64k")
    with open(p, "r+b") as f:
        f.seek(72)
        f.write(struct.pack(">Q", 3))
    before = open(p, "rb").read()
    with pytest.raises(blockpull.ImageFormatError) as ei:
        blockpull.open(p)
    assert "corrupt" in str(ei.value) and "qemu-img check -r all" in str(ei.value)
    assert open(p, "rb").read() == before
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, 4) == b"\x06" * 4


@pytest.mark.parametrize("cluster,gone", [(65536, 1), (512, 1), (512, 64)])
def test_refcount_block_gone_made_anew(tmp_path, qemu, caplog, cluster, gone):
    """A dirty image whose first refcount block (or every one) the table no longer names:
    their clusters are in use but counted nowhere. As QEMU's repair does, new blocks are made (after the
    end of the file, counted by themselves or an existing block)."""
    p = qemu.create(tmp_path / "d.qcow2", 2 * MiB, opts=["lazy_refcounts=on",
                                                         f"cluster_size={cluster}"])
    abort_after(p, "write -P 6 0 64k", "write -P 7 1M 300k")
    with open(p, "r+b") as f:
        rt_off, = struct.unpack(">Q", f.read(64)[48:56])
        f.seek(rt_off)
        f.write(bytes(8 * gone))      # 64: every block (new ones then count new ones)
    line = assert_repaired_qcow2(qemu, p, tmp_path, caplog)
    assert "refcount blocks made" in line
    with blockpull.open(p) as img:
        img.write(1536 * KiB, b"\x08" * 200 * KiB)
    qemu.assert_clean(p)


def table_too_small(qemu, tmp_path, snapshot=False):
    """A dirty lazy-refcount image (512-byte clusters, 64-bit refcounts: one refcount
    block covers 32 KiB of file, one table cluster 2 MiB) whose file grew past what its
    refcount table covers: QEMU grew the table to two clusters, and the header is edited
    back to one, as a writer that died before recording its grown table leaves it. The
    clusters past the first 2 MiB of the file are counted nowhere and the table has no
    room for their blocks. ``snapshot``: an internal snapshot of the first MiB, and a
    compressed cluster, share clusters (counts of 2)."""
    p = qemu.create(tmp_path / "g.qcow2", 16 * MiB, opts=["lazy_refcounts=on", "cluster_size=512",
                                                         "refcount_bits=64"])
    qemu.io(p, "write -P 1 0 1M")
    if snapshot:
        qemu.io(p, "write -c -P 4 8M 512")
        qemu.img("snapshot", "-c", "s1", p)
    abort_after(p, "write -P 2 4M 1536k", "write -P 3 12M 512k")
    with open(p, "r+b") as f:
        f.seek(56)
        clusters, = struct.unpack(">I", f.read(4))
        assert clusters >= 2 and os.path.getsize(p) > 2 * MiB
        f.seek(56)
        f.write(struct.pack(">I", 1))
    return p


@pytest.mark.parametrize("snapshot", [False, True])
def test_refcount_table_too_small_rebuilt(tmp_path, qemu, caplog, snapshot):
    """As QEMU's check does (and ``qemu-img check -r all`` on a copy succeeds), the whole
    refcount structure is rebuilt after the end of the file and the header switched to
    it: qemu-img check clean, the content as before, and the image takes writes."""
    p = table_too_small(qemu, tmp_path, snapshot)
    if snapshot:
        qemu.img("convert", "-U", "-l", "snapshot.name=s1", "-O", "raw", p,
                 str(tmp_path / "s1.before"))
    line = assert_repaired_qcow2(qemu, p, tmp_path, caplog)
    assert "refcount structure rebuilt" in line
    assert qemu.check(str(tmp_path / "oracle.qcow2")) == 0
    with open(p, "rb") as f:
        f.seek(56)
        assert struct.unpack(">I", f.read(4))[0] >= 2
    model = bytearray(open(tmp_path / "before.raw", "rb").read())
    with blockpull.open(p) as img:
        img.write(14 * MiB, b"\x08" * 1 * MiB)
        img.write(0, b"\x09" * 64 * KiB)           # shared with the snapshot, if any
    model[14 * MiB:15 * MiB] = b"\x08" * MiB
    model[:64 * KiB] = b"\x09" * 64 * KiB
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(p)
    assert qemu.compare(p, tmp_path / "model.raw", "qcow2", "raw")
    if snapshot:
        qemu.img("convert", "-l", "snapshot.name=s1", "-O", "raw", p,
                 str(tmp_path / "s1.after"))
        assert (tmp_path / "s1.after").read_bytes() == (tmp_path / "s1.before").read_bytes()


def block_outside(qemu, tmp_path, opts=("cluster_size=4096",)):
    """A dirty image whose refcount table names its first block at 1 GiB, past the end of
    the file."""
    p = qemu.create(tmp_path / "o.qcow2", 8 * MiB, opts=["lazy_refcounts=on", *opts])
    abort_after(p, "write -P 1 0 64k", "write -P 2 6M 64k")
    with open(p, "r+b") as f:
        rt_off, = struct.unpack(">Q", f.read(64)[48:56])
        f.seek(rt_off)
        f.write(struct.pack(">Q", 1 << 30))
    return p


@pytest.mark.parametrize("opts", [["cluster_size=4096"],
                                  ["cluster_size=512", "refcount_bits=1"],
                                  ["cluster_size=512", "refcount_bits=4"]])
def test_refcount_block_past_the_end_rebuilt(tmp_path, qemu, caplog, opts):
    """``qemu-img check -r all`` repairs a refcount block named past the end of the file
    ("Repairing refcount block 0 is outside image", then a rebuild); so does the repair
    on open, by the rebuild, without growing the file to the bogus offset."""
    p = block_outside(qemu, tmp_path, opts)
    q = qemu.img("check", p, check=False)
    assert "refcount block 0 is outside image" in q.stdout + q.stderr
    line = assert_repaired_qcow2(qemu, p, tmp_path, caplog)
    assert "refcount structure rebuilt" in line
    assert qemu.check(str(tmp_path / "oracle.qcow2")) == 0
    assert os.path.getsize(p) < 1 * MiB
    with blockpull.open(p) as img:
        img.write(3 * MiB, b"\x05" * 64 * KiB)
    qemu.assert_clean(p)


def copied_on_shared(qemu, tmp_path):
    """A dirty lazy-refcount image with a snapshot whose shared L2 table (L1 entry 0) and
    four shared data clusters carry COPIED although their refcount is 2 (as a writer that
    died between raising the counts for a snapshot and clearing the flags leaves them)."""
    p = qemu.create(tmp_path / "c.qcow2", 8 * MiB, opts=["lazy_refcounts=on",
                                                        "cluster_size=4096"])
    qemu.io(p, "write -P 3 0 256k")
    qemu.img("snapshot", "-c", "s1", p)
    abort_after(p, "write -P 1 4M 64k")
    copied = 1 << 63
    with open(p, "r+b") as f:
        l1_off, = struct.unpack(">Q", f.read(64)[40:48])
        f.seek(l1_off)
        e, = struct.unpack(">Q", f.read(8))
        assert e and not e & copied
        f.seek(l1_off)
        f.write(struct.pack(">Q", e | copied))
        l2_off = e & 0x00FFFFFFFFFFFE00
        for i in range(4):
            f.seek(l2_off + 8 * i)
            d, = struct.unpack(">Q", f.read(8))
            assert d and not d & copied
            f.seek(l2_off + 8 * i)
            f.write(struct.pack(">Q", d | copied))
    return p


def test_copied_flag_on_shared_cluster_cleared(tmp_path, qemu, caplog):
    """COPIED on entries whose refcount is above 1: QEMU's check clears the flags
    (``qemu-img check -r all``: "Repairing OFLAG_COPIED"); so does the repair on open.
    A write there afterwards must copy, not overwrite the snapshot's clusters."""
    p = copied_on_shared(qemu, tmp_path)
    q = qemu.img("check", p, check=False)
    assert "OFLAG_COPIED L2 cluster" in q.stdout + q.stderr
    assert "OFLAG_COPIED data cluster" in q.stdout + q.stderr
    qemu.img("convert", "-U", "-l", "snapshot.name=s1", "-O", "raw", p,
             str(tmp_path / "s1.before"))
    line = assert_repaired_qcow2(qemu, p, tmp_path, caplog)
    assert "0 COPIED flags set, 5 cleared" in line
    assert qemu.check(str(tmp_path / "oracle.qcow2")) == 0
    model = bytearray(open(tmp_path / "before.raw", "rb").read())
    with blockpull.open(p) as img:
        img.write(0, b"\x09" * 8 * KiB)
    model[:8 * KiB] = b"\x09" * 8 * KiB
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(p)
    assert qemu.compare(p, tmp_path / "model.raw", "qcow2", "raw")
    qemu.img("convert", "-l", "snapshot.name=s1", "-O", "raw", p, str(tmp_path / "s1.after"))
    assert (tmp_path / "s1.after").read_bytes() == (tmp_path / "s1.before").read_bytes()


def test_unrepairable_dirty_image_refused_unchanged(tmp_path, qemu):
    """A dirty image whose data cluster is also its L1 table (two uses): not a matter of
    counts; refused, nothing written, still readable read-only."""
    p = qemu.create(tmp_path / "d.qcow2", 1 * MiB, opts=["lazy_refcounts=on"])
    abort_after(p, "write -P 6 0 64k", "write -P 5 128k 64k")
    with open(p, "r+b") as f:
        hdr = f.read(64)
        l1_off, = struct.unpack(">Q", hdr[40:48])
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_off + 16)                          # cluster 2 -> the L1 table
        f.write(struct.pack(">Q", l1_off | (1 << 63)))
    before = open(p, "rb").read()
    with pytest.raises(blockpull.ImageFormatError) as ei:
        blockpull.open(p)
    msg = str(ei.value)
    assert "d.qcow2" in msg and "dirty" in msg and "qemu-img check -r all" in msg
    assert "\n" not in msg
    assert open(p, "rb").read() == before
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, 4) == b"\x06" * 4


def test_in_use_bitmap_counted_by_the_repair(tmp_path, qemu, caplog):
    """A persistent bitmap's directory, table and data clusters keep their counts: the
    repair counts them. The bitmap itself is left in use by the dead writer, which the
    open then refuses as before (an inconsistent bitmap), with the image repaired."""
    p = qemu.create(tmp_path / "b.qcow2", 8 * MiB, opts=["lazy_refcounts=on"])
    qemu.io(p, "write -P 3 0 256k")
    qemu.img("bitmap", "--add", p, "b0")
    abort_after(p, "write -P 1 0 64k", "write -P 1 2M 64k")
    assert qemu.check(p) == 2
    read_only_raw(p, tmp_path / "before.raw")
    caplog.set_level(logging.INFO, logger=LOG)
    with pytest.raises(blockpull.InconsistentBitmapError):
        blockpull.open(p)
    assert len(repair_lines(caplog)) == 1 and incompat(p) == 0
    qemu.assert_clean(p)
    assert qemu.compare(p, tmp_path / "before.raw", "qcow2", "raw")
    qemu.img("bitmap", "--remove", p, "b0")
    with blockpull.open(p) as img:
        img.write(0, b"x")
    qemu.assert_clean(p)


def test_lazy_refcounts_clean_image_unchanged_and_blockpull_writes_eagerly(tmp_path, qemu,
                                                                           caplog):
    """Lazy refcounts on, image clean: nothing to repair. blockpull writes refcounts
    before references whatever the compatible bit says, so it never sets the dirty bit:
    a blockpull writer killed with SIGKILL leaves a clean (at worst leaky) image."""
    p = qemu.create(tmp_path / "l.qcow2", 4 * MiB, opts=["lazy_refcounts=on"])
    qemu.io(p, "write -P 5 0 1M")
    caplog.set_level(logging.INFO, logger=LOG)
    with blockpull.open(p) as img:
        img.write(1 * MiB, b"\x01" * 64 * KiB)
    assert repair_lines(caplog) == []
    assert incompat(p) == 0
    info = qemu.info(p)
    assert info["format-specific"]["data"]["lazy-refcounts"] and info.get("dirty-flag") is False
    code = ("import blockpull, os, signal, sys\n"
            "img = blockpull.open(sys.argv[1])\n"
            "img.write(2 << 20, b'\\x02' * (200 << 10))\n"
            "img.flush()\n"
            "img.write(3 << 20, b'\\x03' * (100 << 10))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, p], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert incompat(p) == 0
    assert qemu.check(p) in (0, 3)
    with blockpull.open(p, readonly=True) as img:
        assert img.read(2 * MiB, 200 * KiB) == b"\x02" * 200 * KiB


def test_read_only_open_of_dirty_image_repairs_nothing(tmp_path, qemu, caplog):
    p = qemu.create(tmp_path / "d.qcow2", 8 * MiB, opts=["lazy_refcounts=on"])
    abort_after(p, "write -P 1 0 64k", "write -P 2 1M 128k")
    caplog.set_level(logging.INFO, logger=LOG)
    data = read_only_raw(p, tmp_path / "ro.raw")
    assert data[:64 * KiB] == b"\x01" * 64 * KiB and data[MiB:MiB + 128 * KiB] == b"\x02" * 128 * KiB
    assert repair_lines(caplog) == [] and incompat(p) & 1
    assert qemu.compare(p, tmp_path / "ro.raw", "qcow2", "raw")


def test_check_of_dirty_image_says_what_qemu_img_check_says(tmp_path, qemu):
    """``blockpull check`` (read-only, no repair) on a dirty lazy-refcount image: the
    stale refcounts are errors, as qemu-img check counts them (exit 2), and the image
    stays dirty."""
    p = qemu.create(tmp_path / "d.qcow2", 8 * MiB, opts=["lazy_refcounts=on"])
    abort_after(p, "write -P 1 0 64k", "write -P 2 1M 128k")
    q = qemu.img("check", "--output=json", p, check=False)
    qj = json.loads(q.stdout)
    res = blockpull.check(p)
    assert res.exit_code == q.returncode == 2
    assert res.corruptions == qj["corruptions"] and res.leaks == qj.get("leaks", 0)
    r = subprocess.run([sys.executable, "-m", "blockpull", "check", p], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 2, r.stdout + r.stderr
    assert incompat(p) & 1


# ---- QED with need-check ------------------------------------------------------------------

def test_qed_need_check_after_abort_repaired(tmp_path, qemu, caplog):
    p = qemu.create(tmp_path / "n.qed", 8 * MiB, fmt="qed")
    abort_after(p, "write -P 1 0 64k", "write -P 2 3M 100k", fmt="qed")
    assert qed_features(p) & _qed.F_NEED_CHECK      # qemu-io's abort leaves it set
    read_only_raw(p, tmp_path / "before.raw")
    caplog.set_level(logging.INFO, logger=LOG)
    with blockpull.open(p) as img:
        img.write(6 * MiB, b"\x05" * 4096)
    line, = repair_lines(caplog)
    assert "n.qed" in line and "need-check bit cleared" in line
    assert qed_features(p) & _qed.F_NEED_CHECK == 0
    qemu.assert_clean(p, "qed")
    model = bytearray(open(tmp_path / "before.raw", "rb").read())
    model[6 * MiB:6 * MiB + 4096] = b"\x05" * 4096
    (tmp_path / "model.raw").write_bytes(model)
    assert qemu.compare(p, tmp_path / "model.raw", "qed", "raw")


def test_qed_need_check_invalid_entries_cleared_as_qemu_does(tmp_path, qemu, caplog):
    """need-check with an L2 entry past the end of the file and one unaligned: cleared
    (the clusters read as unallocated), as ``qemu-img check -r all`` clears them."""
    p = qemu.create(tmp_path / "n.qed", 8 * MiB, fmt="qed", opts=["cluster_size=4096"])
    qemu.io(p, "write -P 1 0 16k", "write -P 2 1M 4k", fmt="qed")
    with open(p, "r+b") as f:
        hdr = f.read(64)
        l1_off, = struct.unpack("<Q", hdr[40:48])
        f.seek(l1_off)
        l2_off, = struct.unpack("<Q", f.read(8))
        f.seek(l2_off + 8)                           # cluster 1: past the end of the file
        f.write(struct.pack("<Q", 1 << 40))
        f.seek(l2_off + 16)                          # cluster 2: unaligned
        f.write(struct.pack("<Q", 0x20200))
        f.seek(16)
        feats, = struct.unpack("<Q", f.read(8))
        f.seek(16)
        f.write(struct.pack("<Q", feats | _qed.F_NEED_CHECK))
    want = oracle(qemu, p, tmp_path)
    caplog.set_level(logging.INFO, logger=LOG)
    with blockpull.open(p) as img:
        assert img.read(0, 4096) == b"\x01" * 4096
        assert img.read(4096, 8192) == bytes(8192)
        assert img.read(MiB, 4096) == b"\x02" * 4096
    line, = repair_lines(caplog)
    assert "2 invalid table entries cleared" in line
    assert qed_features(p) & _qed.F_NEED_CHECK == 0
    # the clusters the cleared entries named are leaks now, as after qemu-img's repair
    # (QED has no refcounts: leaked space is not given back); no corruption
    q = qemu.img("check", "--output=json", p, check=False)
    qo = qemu.img("check", "--output=json", want, check=False)
    assert q.returncode == qo.returncode == 3
    assert json.loads(q.stdout)["leaks"] == 2
    assert qemu.compare(p, want, "qed", "qed")


def test_qed_need_check_double_reference_refused_unchanged(tmp_path, qemu):
    p = qemu.create(tmp_path / "n.qed", 8 * MiB, fmt="qed", opts=["cluster_size=4096"])
    qemu.io(p, "write -P 1 0 8k", fmt="qed")
    with open(p, "r+b") as f:
        l1_off, = struct.unpack("<Q", f.read(64)[40:48])
        f.seek(l1_off)
        l2_off, = struct.unpack("<Q", f.read(8))
        f.seek(l2_off)
        e0, = struct.unpack("<Q", f.read(8))
        f.seek(l2_off + 8)                           # cluster 1 names cluster 0's data
        f.write(struct.pack("<Q", e0))
        f.seek(16)
        feats, = struct.unpack("<Q", f.read(8))
        f.seek(16)
        f.write(struct.pack("<Q", feats | _qed.F_NEED_CHECK))
    before = open(p, "rb").read()
    with pytest.raises(blockpull.ImageFormatError) as ei:
        blockpull.open(p)
    msg = str(ei.value)
    assert "n.qed" in msg and "need-check" in msg and "qemu-img check -r all" in msg
    assert open(p, "rb").read() == before
    with blockpull.open(p, readonly=True) as img:
        assert img.read(0, 4) == b"\x01" * 4


def test_needs_repair_reads_the_bits():
    q = bytearray(112)
    q[:4] = b"QFI\xfb"
    q[4:8] = struct.pack(">I", 3)
    assert repair.needs_repair(bytes(q), None) is None
    q[72:80] = struct.pack(">Q", 1)
    assert repair.needs_repair(bytes(q), None) == "qcow2"
    assert repair.needs_repair(bytes(q), "qcow2") == "qcow2"
    assert repair.needs_repair(bytes(q), "raw") is None
    q[72:80] = struct.pack(">Q", 3)                 # corrupt too: refused by the open
    assert repair.needs_repair(bytes(q), None) is None
    e = bytearray(64)
    e[:4] = b"QED\0"
    assert repair.needs_repair(bytes(e), None) is None
    e[16:24] = struct.pack("<Q", _qed.F_NEED_CHECK)
    assert repair.needs_repair(bytes(e), None) == "qed"
    assert repair.needs_repair(bytes(e), "qcow2") is None


# ---- crashes and I/O errors during the repair itself --------------------------------------

def _dirty_image(qemu, tmp_path, kind):
    """A dirty qcow2 (counts to raise and to lower; "qcow2-noblock": a refcount block to
    make as well; "qcow2-grow": a refcount table too small, "qcow2-outside": a refcount
    block past the end, "qcow2-copied": COPIED flags to clear) or a QED with need-check and an entry to clear."""
    if kind == "qcow2":
        opts, pre, cmds = CASES["snapshot"]
        p = qemu.create(tmp_path / "d.qcow2", 8 * MiB, opts=["lazy_refcounts=on"])
        qemu.io(p, pre[0])
        qemu.img(*pre[1], p)
        abort_after(p, *cmds)
        return p
    if kind == "qcow2-grow":
        return table_too_small(qemu, tmp_path)
    if kind == "qcow2-outside":
        return block_outside(qemu, tmp_path)
    if kind == "qcow2-copied":
        return copied_on_shared(qemu, tmp_path)
    if kind == "qcow2-noblock":
        p = qemu.create(tmp_path / "d.qcow2", 2 * MiB, opts=["lazy_refcounts=on",
                                                             "cluster_size=512"])
        abort_after(p, "write -P 6 0 64k", "write -P 7 1M 100k")
        with open(p, "r+b") as f:
            rt_off, = struct.unpack(">Q", f.read(64)[48:56])
            f.seek(rt_off)
            f.write(bytes(8))
        return p
    p = qemu.create(tmp_path / "d.qed", 8 * MiB, fmt="qed", opts=["cluster_size=4096"])
    qemu.io(p, "write -P 1 0 16k", fmt="qed")
    abort_after(p, "write -P 2 1M 8k", "write -P 3 7M 4k", fmt="qed")
    with open(p, "r+b") as f:
        l1_off, = struct.unpack("<Q", f.read(64)[40:48])
        f.seek(l1_off)
        l2_off, = struct.unpack("<Q", f.read(8))
        f.seek(l2_off + 8 * 5)                   # cluster 5: past the end of the file
        f.write(struct.pack("<Q", 1 << 40))
    return p


def _before(qemu, p, tmp_path, fmt, out):
    """What the image reads before the repair (qcow2: a read-only open; QED, whose entry
    past the end cannot be read: what qemu-img check -r all makes of it), into ``out``."""
    if fmt == "qcow2":
        return read_only_raw(p, out)
    return qemu.to_raw(oracle(qemu, p, tmp_path), str(out))


def _recorded(monkeypatch, inj):
    """The repair's file gets ``inj`` as its fault layer (records, fails, kills)."""
    real = repair.File

    def opened(path, writable, role, *rest):
        f = real(path, writable, role, *rest)
        if writable:
            f.faults = inj
        return f
    monkeypatch.setattr(repair, "File", opened)


def _bit_set(p, fmt):
    return bool(incompat(p) & 1) if fmt == "qcow2" else bool(qed_features(p) & _qed.F_NEED_CHECK)


def _assert_sound_after_repair(qemu, p, fmt, before_raw, what):
    """``p`` repaired (by this open if its bit is still set): no corruption, the same
    content as before."""
    with blockpull.open(p) as img:
        img.read(0, 512)
    assert not _bit_set(p, fmt), what
    rc = qemu.check(p, fmt)
    assert rc in ((0,) if fmt == "qcow2" else (0, 3)), f"{what}: qemu-img check exit {rc}"
    assert qemu.compare(p, before_raw, fmt, "raw"), what


@pytest.mark.parametrize("kind", ["qcow2", "qcow2-noblock", "qcow2-grow",
                                  "qcow2-outside", "qcow2-copied", "qed"])
def test_power_loss_during_the_repair(tmp_path, qemu, monkeypatch, kind):
    """Every state a power cut can leave during the repair (each sync point, the writes
    after it kept or not, torn by sector): either the bit is still set and the image
    reads as before (a writable open repairs it again), or the repair is durable."""
    from blockpull import faults
    import random
    fmt = kind.split("-")[0]
    p = _dirty_image(qemu, tmp_path, kind)
    initial = open(p, "rb").read()
    before = tmp_path / "before.raw"
    want = _before(qemu, p, tmp_path, fmt, before)
    inj = faults.FaultInjector()
    _recorded(monkeypatch, inj)
    blockpull.open(p).close()
    monkeypatch.undo()
    ops = [o for o in inj.ops(p) if o.op in ("write", "sync")]
    assert ops and ops[-1].op == "sync" and sum(o.op == "sync" for o in ops) >= 2
    rp = faults.Replayer(initial, ops)
    n = 0
    for k, data, desc in rp.states(random.Random(12), per_sync=3):
        s = str(tmp_path / f"state.{fmt}")
        with open(s, "wb") as f:
            f.write(data)
        if _bit_set(s, fmt) and fmt == "qcow2":     # the QED one has an entry unreadable
            with blockpull.open(s, readonly=True) as img:
                assert img.read(0, img.size) == want, desc
        elif not _bit_set(s, fmt):
            assert k >= rp.nsyncs - 1, f"{desc}: bit cleared before the repair was durable"
        _assert_sound_after_repair(qemu, s, fmt, before, desc)
        n += 1
    assert n >= 6


@pytest.mark.parametrize("kind", ["qcow2", "qcow2-noblock", "qcow2-grow",
                                  "qcow2-outside", "qcow2-copied", "qed"])
def test_io_errors_during_the_repair(tmp_path, qemu, monkeypatch, kind):
    """EIO at each write and each sync of the repair: the open fails with that OSError;
    the next one repairs (or finds it repaired), and nothing is lost."""
    from blockpull import faults
    import errno
    fmt = kind.split("-")[0]
    p = _dirty_image(qemu, tmp_path, kind)
    initial = open(p, "rb").read()
    before = tmp_path / "before.raw"
    _before(qemu, p, tmp_path, fmt, before)
    inj = faults.FaultInjector(record_writes=False)
    _recorded(monkeypatch, inj)
    blockpull.open(p).close()
    counts = dict(inj.counts)
    for op in ("write", "sync"):
        for nth in range(1, counts.get((op, "top"), 0) + 1):
            what = f"EIO at {op} {nth}"
            with open(p, "wb") as f:
                f.write(initial)
            inj = faults.FaultInjector(record_writes=False)
            rule = inj.fail(op, role="top", errno=errno.EIO, nth=nth)
            _recorded(monkeypatch, inj)
            with pytest.raises(OSError) as ei:
                blockpull.open(p)
            assert ei.value.errno == errno.EIO and rule.fired == 1, what
            monkeypatch.undo()
            _assert_sound_after_repair(qemu, p, fmt, before, what)
