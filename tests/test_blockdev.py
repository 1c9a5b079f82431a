"""Images and backings on block devices (loop devices here; LVM volumes in production).

A device's size comes from the kernel, never st_size (0 for a device); a device is never
truncated or fallocated and cannot grow, so allocating past its end is ENOSPC. Judged by
qemu-img compare, check, info and map.
"""
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

import blockpull
from blockpull._fileio import FALLOC_PUNCH_HOLE, File
from relhelp import child_env

MiB = 1 << 20


@pytest.fixture
def loopdev(tmp_path):
    """Factory: ``loopdev(size, data=None)`` attaches a loop device over a new file of
    ``size`` bytes (starting with ``data``) and returns its path; every device is
    detached in teardown. Without losetup or the right to use it the test skips, but
    fails under CI."""
    devices = []

    def unavailable(msg):
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)

    def make(size, data=None):
        if shutil.which("losetup") is None:
            unavailable("losetup is required for block device tests (package mount)")
        backing = tmp_path / f"loop{len(devices)}.img"
        with open(backing, "wb") as f:
            if data:
                f.write(data)
            f.truncate(size)
        r = subprocess.run(["losetup", "-f", "--show", str(backing)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            unavailable(f"losetup -f --show failed (root is needed): {r.stderr.strip()}")
        dev = r.stdout.strip()
        devices.append(dev)
        return dev

    yield make
    for dev in devices:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def qemu_check_json(qemu, path, fmt):
    r = qemu.img("check", "-f", fmt, "--output=json", path, check=False)
    assert r.returncode in (0, 3), f"qemu-img check {path}: {r.returncode}\n{r.stdout}{r.stderr}"
    return json.loads(r.stdout)


def test_raw_backing_on_device_is_pulled(tmp_path, qemu, loopdev):
    data = os.urandom(8 * MiB)
    dev = loopdev(8 * MiB, data)
    top = str(tmp_path / "t.qcow2")
    qemu.create(top, 8 * MiB, backing=dev, backing_fmt="raw")
    before = tmp_path / "before.raw"
    assert qemu.to_raw(top, before) == data
    with blockpull.open(top) as img:
        assert img.size == 8 * MiB
        assert img.chain[1].size == 8 * MiB
        assert img.read(0, 8 * MiB) == data
        info = img.pull().result(timeout=60)
    assert info.status == "completed"
    assert info.copied_bytes == 8 * MiB
    qemu.assert_clean(top)
    assert qemu.compare(before, top, "raw", "qcow2")
    assert "backing-filename" not in qemu.info(top)


def test_create_sizes_overlay_from_device(tmp_path, qemu, loopdev):
    dev = loopdev(4 * MiB, b"\x5a" * MiB)
    top = str(tmp_path / "t.qcow2")
    blockpull.create(top, 0, backing=dev, backing_format="raw")
    assert qemu.info(top)["virtual-size"] == 4 * MiB
    assert qemu.compare(dev, top, "raw", "qcow2")


def test_file_on_device(loopdev):
    dev = loopdev(4 * MiB, b"\xa5" * (4 * MiB))
    f = File(dev, True)
    try:
        assert f.is_device
        assert f.size() == 4 * MiB
        f.truncate(MiB)                       # never shrinks a device
        f.fallocate(0, MiB, FALLOC_PUNCH_HOLE)  # never punches one
        f.fallocate(0, 4 * MiB)
        for op in (lambda: f.truncate(4 * MiB + 512), lambda: f.fallocate(4 * MiB, 512)):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.ENOSPC
        assert f.size() == 4 * MiB
        assert f.pread(0, 4 * MiB) == b"\xa5" * (4 * MiB)
        assert f.next_data(0) == (0, 4 * MiB)
    finally:
        f.close()


def test_file_on_regular_file_is_not_a_device(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"1" * 1000)
    f = File(str(p), True)
    try:
        assert not f.is_device
        assert f.size() == 1000
        f.truncate(4096)
        assert f.size() == 4096
    finally:
        f.close()


@pytest.fixture
def qcow2_dev(tmp_path, qemu, loopdev):
    """A qcow2 overlay on a 32 MiB device (virtual 16 MiB) over a qcow2 base file, both
    with data; returns (device, base, raw image of what the chain reads)."""
    base = qemu.create(tmp_path / "base.qcow2", 16 * MiB)
    qemu.io(base, "write -P 0x11 0 6M", "write -P 0x12 9M 3M")
    dev = loopdev(32 * MiB)
    qemu.create(dev, 16 * MiB, backing=base, backing_fmt="qcow2")
    qemu.io(dev, "write -P 0x21 1M 1M", "write -z 4M 512k", "write -P 0x22 15M 64k",
            fmt="qcow2")
    want = tmp_path / "want.raw"
    qemu.to_raw(dev, want)
    return dev, base, want


def test_qcow2_on_device_reads_writes_and_is_pulled_into(tmp_path, qemu, qcow2_dev):
    dev, base, want = qcow2_dev
    expect = bytearray(want.read_bytes())
    with blockpull.open(dev) as img:
        assert img.format == "qcow2" and img.size == 16 * MiB
        assert img.read(0, img.size) == bytes(expect)
        img.write(7 * MiB + 100, b"\x77" * 300_000)
        expect[7 * MiB + 100:7 * MiB + 100 + 300_000] = b"\x77" * 300_000
        img.flush()
        info = img.pull().result(timeout=60)
        assert info.status == "completed"
        assert img.read(0, img.size) == bytes(expect)
    qemu.assert_clean(dev, "qcow2")
    res = qemu_check_json(qemu, dev, "qcow2")
    assert res["check-errors"] == 0 and "leaks" not in res
    exp = tmp_path / "expect.raw"
    exp.write_bytes(bytes(expect))
    assert qemu.compare(exp, dev, "raw", "qcow2")
    info = qemu.info(dev)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    # the device was not resized, and blockpull's own check agrees with qemu-img's
    with open(dev, "rb") as f:
        assert f.seek(0, os.SEEK_END) == 32 * MiB
    assert blockpull.check(dev).exit_code == 0


def test_qcow2_on_device_serves_as_backing(tmp_path, qemu, qcow2_dev):
    dev, base, want = qcow2_dev
    top = qemu.create(tmp_path / "top.qcow2", 16 * MiB, backing=dev, backing_fmt="qcow2")
    qemu.io(top, "write -P 0x31 2M 64k")
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        assert img.chain[1].path == dev and img.chain[1].format == "qcow2"
        assert img.pull(base=dev).result(timeout=60).status == "completed"
    qemu.assert_clean(top)
    assert qemu.compare(want, top, "raw", "qcow2")
    assert qemu.info(top)["backing-filename"] == dev
    with blockpull.open(top) as img:
        assert img.pull().result(timeout=60).status == "completed"
    assert qemu.compare(want, top, "raw", "qcow2")
    assert "backing-filename" not in qemu.info(top)


def test_qcow2_on_full_device_is_enospc(tmp_path, qemu, loopdev):
    """A 1 MiB device holds the metadata and a few clusters: a pull that needs more
    fails with ENOSPC, keeps the backing link, and leaves a consistent image that reads
    what it read before."""
    base = qemu.create(tmp_path / "base.qcow2", 8 * MiB)
    qemu.io(base, "write -P 0x44 0 8M")
    dev = loopdev(MiB)
    qemu.create(dev, 8 * MiB, backing=base, backing_fmt="qcow2")
    want = tmp_path / "want.raw"
    qemu.to_raw(dev, want)
    with blockpull.open(dev) as img:
        with pytest.raises(OSError) as ei:
            img.write(0, b"\x01" * (2 * MiB))
        assert ei.value.errno == errno.ENOSPC
    qemu_check_json(qemu, dev, "qcow2")
    for policy in ("report", "ignore"):
        with blockpull.open(dev) as img:
            job = img.pull(on_error=policy)
            job.wait(60)
            assert job.status == "failed"
            assert "no space left" in str(job.error).lower()
            if policy == "report":
                assert job.error.errno == errno.ENOSPC
    res = qemu_check_json(qemu, dev, "qcow2")
    assert res["check-errors"] == 0 and "corruptions" not in res
    assert qemu.info(dev)["backing-filename"] == base
    assert qemu.compare(want, dev, "raw", "qcow2")
    with open(dev, "rb") as f:
        assert f.seek(0, os.SEEK_END) == MiB


def test_qed_on_device_is_pulled_into(tmp_path, qemu, loopdev):
    """QED on a device: QEMU appends at the device's end (ENOSPC); here new clusters go
    after the last one the image references, inside the device."""
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(3 * MiB) + bytes(MiB))
    q = qemu.create(tmp_path / "q.qed", 4 * MiB, fmt="qed", backing=str(base),
                    backing_fmt="raw")
    qemu.io(q, "write -P 0x55 1M 128k", fmt="qed")
    dev = loopdev(16 * MiB, open(q, "rb").read())
    want = tmp_path / "want.raw"
    qemu.to_raw(dev, want)
    leaks_before = qemu_check_json(qemu, dev, "qed").get("leaks", 0)
    with blockpull.open(dev) as img:
        assert img.format == "qed"
        assert img.read(0, img.size) == want.read_bytes()
        info = img.pull().result(timeout=60)
        assert info.status == "completed"
    res = qemu_check_json(qemu, dev, "qed")
    assert res["check-errors"] == 0 and "corruptions" not in res
    # the copied clusters now count as used: the unused rest of the device is smaller
    assert res.get("leaks", 0) == leaks_before - (3 * MiB - 128 * 1024) // 65536
    assert qemu.compare(want, dev, "raw", "qed")
    assert "backing-filename" not in qemu.info(dev)
    mine = blockpull.check(dev)
    assert (mine.corruptions, mine.leaks) == (0, res.get("leaks", 0))


def test_device_image_takes_qemu_locks(qemu, qcow2_dev):
    dev, _base, _want = qcow2_dev
    with blockpull.open(dev):
        r = qemu.img("info", dev, check=False)
        assert r.returncode != 0 and "lock" in r.stderr.lower()
    qemu.img("info", dev)


def test_info_on_device(qemu, qcow2_dev):
    """The chain and sizes of an image on a device; it takes the whole device (st_blocks
    of a device node is 0)."""
    dev, base, _want = qcow2_dev
    r = subprocess.run([sys.executable, "-m", "blockpull", "info", "--output", "json", dev],
                       capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    top = report["chain"][0]
    assert top["format"] == "qcow2"
    assert top["virtual_size"] == qemu.info(dev)["virtual-size"] == 16 * MiB
    assert top["disk_size"] == 32 * MiB
    assert os.path.samefile(report["chain"][1]["path"], base)


def _alias(tmp_path, dev):
    """A second device node for ``dev`` (another inode, the same device)."""
    import stat
    alias = tmp_path / "alias"
    try:
        os.mknod(alias, stat.S_IFBLK | 0o600, os.stat(dev).st_rdev)
        open(alias, "rb").close()
    except OSError as exc:
        msg = f"cannot make a device node here ({exc}); root and a dev mount are needed"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return str(alias)


def test_device_known_by_any_of_its_nodes(tmp_path, qemu, qcow2_dev):
    """Two device nodes of one device are one image: as a base, and in a loop."""
    dev, base, want = qcow2_dev
    alias = _alias(tmp_path, dev)
    top = qemu.create(tmp_path / "top.qcow2", 16 * MiB, backing=dev, backing_fmt="qcow2")
    qemu.io(top, "write -P 0x31 2M 64k")
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        assert img.base_depth(alias) == 1
        assert img.pull(base=base).result(timeout=60).status == "completed"
    assert qemu.compare(want, top, "raw", "qcow2")
    assert qemu.info(top)["backing-filename"] == base
    # the device's image names the device itself by its other node
    qemu.img("rebase", "-u", "-f", "qcow2", "-b", alias, "-F", "qcow2", dev)
    with pytest.raises(blockpull.errors.BackingChainError, match="loops"):
        blockpull.open(dev)
