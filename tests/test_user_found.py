"""Wrong results, crashes and misleading messages found by using blockpull as a user
would (the command line and the API on odd images), each judged by qemu-img.

Run as a script (``python test_user_found.py full-disk-writes DIR BITMAP``) it is the
child that one test runs inside a private mount namespace (see ``full_disk_child``).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

import blockpull
from relhelp import PY, child_env
from test_blockdev import loopdev  # noqa: F401 (a fixture)

MiB = 1 << 20
HERE = os.path.abspath(__file__)


def cli(*args, cwd=None):
    return subprocess.run([PY, "-m", "blockpull", *args], capture_output=True, text=True,
                          env=child_env(), cwd=cwd, timeout=20)


# ---- map of raw holes ------------------------------------------------------------------


def test_map_json_names_the_offset_of_raw_holes(tmp_path, qemu):
    """qemu-img map gives a raw file's holes their own offset (the file is the disk);
    ``map --output json`` must print exactly the same, for a raw image and for a raw
    backing under a qcow2 overlay."""
    raw = tmp_path / "r.raw"
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"abc")
    top = qemu.create(tmp_path / "t.qcow2", 4 * MiB, backing="r.raw", backing_fmt="raw")
    qemu.io(top, "write -P 1 2M 64k")
    for spec in (["-f", "raw", str(raw)], [top]):
        want = qemu.img("map", "--output=json", *spec).stdout
        r = cli("map", "--output", "json", *spec)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == json.loads(want)
        assert r.stdout == want


# ---- bandwidths too large for the rate limiter ------------------------------------------


def test_huge_bandwidth_is_bad_usage_not_a_crash(tmp_path, qemu):
    base = qemu.create(tmp_path / "b.qcow2", MiB)
    qemu.io(base, "write -P 1 0 1M")
    top = qemu.create(tmp_path / "t.qcow2", MiB, backing="b.qcow2")
    r = cli("pull", "--bandwidth", "99999999999999999999999T", top)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "too large" in lines[0] and "unexpected" not in lines[0]
    with blockpull.open(top) as img:
        for bw in (1 << 64, "8E"):
            with pytest.raises(ValueError, match="too large"):
                img.pull(bandwidth=bw)
        with pytest.raises(ValueError, match="bandwidth"):
            img.pull(bandwidth=-5)
        assert img.job is None or img.job.done()
        job = img.pull()
        with pytest.raises(ValueError, match="too large"):
            job.set_speed(1 << 70)
        assert job.result(timeout=60).status == "completed"
    qemu.assert_clean(top)
    assert qemu.compare(top, base)


# ---- a full block device ----------------------------------------------------------------


def test_full_block_device_says_so(tmp_path, qemu, loopdev):
    """ENOSPC on a block device is a device that cannot grow, not a file system to
    clean up: the message says to grow the device. The image stays as it read."""
    base = qemu.create(tmp_path / "base.qcow2", 32 * MiB)
    qemu.io(base, "write -P 0x33 0 32M")
    dev = loopdev(16 * MiB)
    qemu.create(dev, 32 * MiB, backing=str(base))
    before = qemu.to_raw(dev, tmp_path / "before.raw")
    r = cli("pull", "--no-progress", dev)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "block device" in lines[0] and "grow the device" in lines[0], lines[0]
    assert "file system" not in lines[0] and "make room" not in lines[0]
    qemu.assert_clean(dev)
    assert qemu.to_raw(dev, tmp_path / "after.raw") == before
    assert qemu.info(dev)["backing-filename"] == str(base)


# ---- backing names with a trailing slash ------------------------------------------------


@pytest.mark.parametrize("name", ["b.qcow2/", "b.qcow2/.", "./b.qcow2//"])
def test_backing_name_with_trailing_slash_is_not_a_file(tmp_path, qemu, name):
    """A trailing slash names a directory: the kernel refuses it after a file (ENOTDIR)
    and so does QEMU. It must not open b.qcow2 (nor a pull copy from it)."""
    base = qemu.create(tmp_path / "b.qcow2", MiB)
    qemu.io(base, "write -P 1 0 1M")
    top = str(tmp_path / "t.qcow2")
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "qcow2", top, "1M")
    assert qemu.img("info", "--backing-chain", top, check=False).returncode != 0
    before = open(top, "rb").read()
    with pytest.raises(blockpull.BackingChainError):
        blockpull.open(top, readonly=True)
    r = cli("pull", top)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert open(top, "rb").read() == before


# ---- named pipes ------------------------------------------------------------------------


def test_named_pipe_is_refused_not_waited_on(tmp_path, qemu):
    """Opening a FIFO waits for a writer, for ever if none comes: as the image, or as the
    backing file an image names (a hostile image can), every command refuses it at once
    with a named error (each run here has a timeout, so a hang fails)."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    top = str(tmp_path / "t.qcow2")
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", "pipe", "-F", "raw", top, "1M")
    for args, code in [(["info", str(pipe)], 2), (["pull", "-f", "raw", str(pipe)], 2),
                       (["check", str(pipe)], 1), (["info", top], 2), (["pull", top], 2),
                       (["map", top], 2),
                       (["create", "-b", str(pipe), "-F", "raw", str(tmp_path / "x.qcow2")], 2)]:
        r = cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert "named pipe" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "x.qcow2")


def test_create_on_a_block_device_says_what_to_do(tmp_path, qemu, loopdev):
    """create makes files only. On an existing device (an LV) "already exists; remove it
    or choose another name" is no advice: the error says it is a device and how to
    format one. The device is left as it was."""
    data = os.urandom(MiB)
    dev = loopdev(4 * MiB, data)
    base = qemu.create(tmp_path / "b.qcow2", MiB)
    for args in (["create", dev, "1M"], ["create", "-f", "qed", "-b", base, dev]):
        r = cli(*args)
        assert r.returncode == 2, r.stderr
        assert "block device" in r.stderr and "remove it" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(blockpull.ImageFormatError, match="block device"):
        blockpull.create(dev, MiB)
    with open(dev, "rb") as f:
        assert f.read(MiB) == data


# ---- guest writes on a full disk, with and without a persistent bitmap ------------------


def full_disk_child(work: str, bitmap: str, room_before_close: bool = False) -> None:
    """In a private mount namespace: a qcow2 image (4 KiB clusters, 64 MiB) on a 10 MiB
    tmpfs filled to 600 KiB of free space; 3000-byte guest writes every 64 KiB until one
    fails with ENOSPC, then flush and close (their errors noted), then room again (with
    ``room_before_close``: flush, room again, flush and close). Prints JSON: how many
    writes were acknowledged and how many of them read back."""
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10M", "tmpfs", mnt], check=True)
    try:
        p = os.path.join(mnt, "g.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                        p, "64M"], check=True)
        if bitmap == "yes":
            subprocess.run(["qemu-img", "bitmap", "--add", "-g", "512", p, "b0"], check=True)
        st = os.statvfs(mnt)
        with open(os.path.join(mnt, "fill"), "wb") as f:
            f.write(b"x" * (st.f_bavail * st.f_frsize - 600 * 1024))
        acked, errors = [], []
        img = blockpull.open(p)
        for i in range(1000):
            data = bytes([i % 250 + 1]) * 3000
            try:
                img.write(i * 65536, data)
            except OSError as e:
                errors.append(("write", e.errno))
                break
            acked.append((i * 65536, data))
        steps = ["flush", "room", "flush", "close"] if room_before_close else \
            ["flush", "close", "room"]
        for what in steps:
            if what == "room":
                os.unlink(os.path.join(mnt, "fill"))
                continue
            try:
                getattr(img, what)()
            except OSError as e:
                errors.append((what, e.errno))
        check = subprocess.run(["qemu-img", "check", p], capture_output=True).returncode
        with blockpull.open(p, readonly=True) as img:
            kept = sum(img.read(off, len(d)) == d for off, d in acked)
        print(json.dumps({"acked": len(acked), "kept": kept, "errors": errors,
                          "check": check}))
    finally:
        subprocess.run(["umount", mnt])


@pytest.mark.parametrize("bitmap,room", [
    ("no", "after-close"),
    ("no", "before-close"),
    ("yes", "after-close"),
    ("yes", "before-close"),
])
def test_full_disk_keeps_acknowledged_guest_writes(tmp_path, qemu, bitmap, room):
    """A write that returned keeps its data once the disk has room again (the flush
    and close that hit the full disk may fail; then qemu-img check is clean and every
    acknowledged write reads back), with or without an enabled persistent bitmap:
    QEMU keeps the data and leaves the bitmap in use."""
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]
    r = subprocess.run(prefix + [PY, HERE, "full-disk-writes", str(tmp_path), bitmap, room],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert ["write", errno.ENOSPC] in res["errors"], res   # the disk did fill up
    assert res["acked"] > 50, res
    assert res["check"] == 0, res
    assert res["kept"] == res["acked"], res


if __name__ == "__main__":
    if sys.argv[1] == "full-disk-writes":
        full_disk_child(sys.argv[2], sys.argv[3], sys.argv[4] == "before-close")
