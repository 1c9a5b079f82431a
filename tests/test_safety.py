"""Backing-chain safety and QEMU's image locks, judged by qemu-img and qemu-storage-daemon."""
import os
import shutil
import struct
import subprocess
import sys
import time

import pytest

import blockpull
from blockpull.image import MAX_CHAIN_DEPTH
from relhelp import child_env


def set_backing_raw(path, name: bytes, at: int = 2048) -> None:
    """Point the qcow2 header's backing name at ``name`` written at byte ``at``."""
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(name)
        f.seek(8)
        f.write(struct.pack(">QI", at, len(name)))


# ---- backing names ------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    b'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/etc/passwd"}}',
    b"nbd:unix:/tmp/sock",
    b"nbd+unix:///export?socket=/tmp/sock",
    b"http://example.com/base.qcow2",
    b"ssh://host/base.qcow2",
    b"",
    b"base.qcow2\0../../etc/passwd",
    b"a" * 1024,
], ids=["json", "nbd", "nbd+unix", "http", "ssh", "empty", "nul", "1024-bytes"])
def test_unsafe_backing_names_refused(tmp_path, qemu, name):
    base = qemu.create(tmp_path / "base.qcow2", 1 << 20)
    top = qemu.create(tmp_path / "top.qcow2", 1 << 20, backing="base.qcow2")
    set_backing_raw(top, name)
    for ro in (True, False):
        with pytest.raises(blockpull.BackingChainError) as ei:
            blockpull.open(top, readonly=ro, backing_format="qcow2")
        msg = str(ei.value)
        assert "top.qcow2" in msg and "\n" not in msg


def test_name_of_1023_bytes_is_accepted(tmp_path, qemu):
    d = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200)
    d.mkdir(parents=True)
    base = qemu.create(d / "b.qcow2", 1 << 20)
    qemu.io(base, "write -P 7 0 4k")
    rel = os.path.relpath(base, tmp_path).encode()
    name = b"./" * ((1023 - len(rel)) // 2) + rel
    if len(name) < 1023:
        name = name.replace(b"/", b"//", 1)
    assert len(name) == 1023
    top = qemu.create(tmp_path / "top.qcow2", 1 << 20, backing=str(base))
    set_backing_raw(top, name)
    with blockpull.open(top, readonly=True, backing_format="qcow2") as img:
        assert os.path.samefile(img.backing, base)
        assert img.read(0, 4096) == b"\x07" * 4096


def test_backing_loop_refused(tmp_path, qemu):
    a = qemu.create(tmp_path / "a.qcow2", 1 << 20)
    b = qemu.create(tmp_path / "b.qcow2", 1 << 20, backing="a.qcow2")
    qemu.img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    for p in (a, b):
        with pytest.raises(blockpull.BackingChainError, match="loops") as ei:
            blockpull.open(p, readonly=True)
        assert os.path.basename(p) in str(ei.value)


def test_backing_loop_through_symlink_refused(tmp_path, qemu):
    a = qemu.create(tmp_path / "a.qcow2", 1 << 20)
    os.symlink("a.qcow2", tmp_path / "link.qcow2")
    qemu.img("rebase", "-u", "-b", "link.qcow2", "-F", "qcow2", a)
    with pytest.raises(blockpull.BackingChainError, match="loops") as ei:
        blockpull.open(a)
    assert "a.qcow2" in str(ei.value)
    # a symlink to a distinct file is a fine backing
    qemu.create(tmp_path / "real.qcow2", 1 << 20)
    os.unlink(tmp_path / "link.qcow2")
    os.symlink("real.qcow2", tmp_path / "link.qcow2")
    with blockpull.open(a, readonly=True) as img:
        assert len(img.chain) == 2


def test_chain_depth_capped(tmp_path):
    prev = None
    paths = []
    for i in range(MAX_CHAIN_DEPTH + 1):
        p = str(tmp_path / f"l{i}.qcow2")
        blockpull.create(p, 1 << 20, backing=prev, backing_format="qcow2" if prev else None)
        paths.append(p)
        prev = os.path.basename(p)
    with blockpull.open(paths[-2], readonly=True) as img:
        assert len(img.chain) == MAX_CHAIN_DEPTH
    with pytest.raises(blockpull.BackingChainError, match="deeper") as ei:
        blockpull.open(paths[-1], readonly=True)
    assert "l%d.qcow2" % MAX_CHAIN_DEPTH in str(ei.value)


def test_unrecorded_format_never_guessed(tmp_path, qemu):
    base = qemu.create(tmp_path / "b.qcow2", 1 << 20)
    qemu.io(base, "write -P 3 0 64k")
    top = str(tmp_path / "t.qcow2")
    qemu.img("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", top, "1M")
    # remove the backing-format extension: it is the first one after the v3 header
    with open(top, "r+b") as f:
        f.seek(100)
        hlen = struct.unpack(">I", f.read(4))[0]
        f.seek(hlen)
        etype, elen = struct.unpack(">II", f.read(8))
        assert etype == 0xE2792ACA
        f.seek(hlen)
        f.write(struct.pack(">II", 0x12345678, elen))  # an unknown extension: ignored
    with pytest.raises(blockpull.BackingChainError, match="backing_format") as ei:
        blockpull.open(top)
    assert "t.qcow2" in str(ei.value)
    with pytest.raises(blockpull.BackingChainError):
        blockpull.open(top, readonly=True)
    with blockpull.open(top, readonly=True, backing_format="qcow2") as img:
        assert img.read(0, 65536) == b"\x03" * 65536
    with blockpull.open(top, readonly=True, backing_format={"b.qcow2": "raw"}) as img:
        assert img.chain[1].format == "raw"


def test_backing_opened_read_only(tmp_path, qemu):
    base = qemu.create(tmp_path / "b.qcow2", 2 << 20)
    qemu.io(base, "write -P 5 0 2M")
    os.chmod(base, 0o444)
    before = (open(base, "rb").read(), os.stat(base).st_mtime_ns)
    top = qemu.create(tmp_path / "t.qcow2", 2 << 20, backing="b.qcow2")
    with blockpull.open(top) as img:
        img.write(1000, b"x" * 100_000)
        img.write_zeroes(300_000, 70_000)
        img.flush()
        # the backing is locked against writers while we use it
        r = qemu.run("qemu-io", "-c", "write 0 512", str(base), check=False)
        assert r.returncode != 0 and "lock" in r.stderr
    assert (open(base, "rb").read(), os.stat(base).st_mtime_ns) == before
    qemu.assert_clean(top)


# ---- QEMU's locks ---------------------------------------------------------------------

class Daemon:
    """qemu-storage-daemon holding one qcow2 image, read-write or read-only."""

    def __init__(self, path, sock, writable=True):
        ro = "" if writable else ",read-only=on"
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={path}{ro}",
                "--blockdev", f"driver=qcow2,node-name=q,file=f{ro}",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"type=nbd,id=e,node-name=q,writable={'on' if writable else 'off'}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.sock = sock

    def wait_ready(self, timeout=10.0) -> None:
        end = time.monotonic() + timeout
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise AssertionError("qemu-storage-daemon exited: %s" % self.proc.stderr.read().decode())
            if time.monotonic() > end:
                raise AssertionError("qemu-storage-daemon did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemon(tmp_path, qemu):
    """Start qemu-storage-daemon on an image; every daemon is stopped at test end."""
    if not shutil.which("qemu-storage-daemon"):
        pytest.fail("qemu-storage-daemon is required (apt-get install qemu-system-common)")
    started = []

    def start(path, writable=True, wait=True):
        d = Daemon(str(path), str(tmp_path / f"nbd{len(started)}.sock"), writable)
        started.append(d)
        if wait:
            d.wait_ready()
        return d
    yield start
    for d in started:
        d.stop()


def lock_bytes(path):
    """The set of (first, last) byte ranges /proc/locks shows on ``path``'s inode."""
    st = os.stat(path)
    tag = ":%d " % st.st_ino
    out = set()
    with open("/proc/locks") as f:
        for line in f:
            if tag in line and "OFDLCK" in line:
                a, b = line.split()[-2:]
                out.update(range(int(a), int(b) + 1))
    return out


@pytest.mark.parametrize("writable", [True, False])
def test_lock_bytes_match_qemu(tmp_path, qemu, daemon, writable):
    img = qemu.create(tmp_path / "x.qcow2", 1 << 20)
    d = daemon(img, writable=writable)
    qemu_bytes = lock_bytes(img)
    d.stop()
    assert lock_bytes(img) == set()
    with blockpull.open(img, readonly=not writable):
        assert lock_bytes(img) == qemu_bytes
    assert qemu_bytes == ({100, 101, 103, 201, 203} if writable else {100, 201, 203})


def test_qemu_writer_refuses_us(tmp_path, qemu, daemon):
    img = qemu.create(tmp_path / "x.qcow2", 1 << 20)
    daemon(img, writable=True)
    for ro in (False, True):
        with pytest.raises(blockpull.ImageLockedError) as ei:
            blockpull.open(img, readonly=ro)
        assert "x.qcow2" in str(ei.value)
    # QEMU's own reader refuses the same way, and -U skips the check
    assert qemu.img("info", img, check=False).returncode != 0
    assert qemu.img("info", "-U", img, check=False).returncode == 0


def test_qemu_reader_allows_our_reader_only(tmp_path, qemu, daemon):
    img = qemu.create(tmp_path / "x.qcow2", 1 << 20)
    qemu.io(img, "write -P 1 0 4k")
    daemon(img, writable=False)
    with blockpull.open(img, readonly=True) as i:
        assert i.read(0, 4096) == b"\x01" * 4096
    with pytest.raises(blockpull.ImageLockedError):
        blockpull.open(img)


def test_our_writer_refuses_qemu(tmp_path, qemu, daemon):
    img = qemu.create(tmp_path / "x.qcow2", 1 << 20)
    with blockpull.open(img):
        r = qemu.img("info", img, check=False)
        assert r.returncode != 0 and "lock" in r.stderr
        assert qemu.img("info", "-U", img, check=False).returncode == 0
        d = daemon(img, writable=False, wait=False)
        assert d.proc.wait(10) != 0
        assert b"lock" in d.proc.stderr.read()
    with blockpull.open(img, readonly=True):
        assert qemu.img("info", img, check=False).returncode == 0
    assert qemu.img("info", img, check=False).returncode == 0


def test_two_writers_conflict_across_processes(tmp_path, qemu):
    img = qemu.create(tmp_path / "x.qcow2", 1 << 20)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, blockpull; i = blockpull.open(sys.argv[1]); print('ready', flush=True); "
         "sys.stdin.read()", img],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=child_env())
    try:
        assert child.stdout.readline().strip() == b"ready"
        for ro in (False, True):
            with pytest.raises(blockpull.ImageLockedError) as ei:
                blockpull.open(img, readonly=ro)
            assert "x.qcow2" in str(ei.value)
    finally:
        child.stdin.close()
        child.wait(10)
    with blockpull.open(img) as a:
        with pytest.raises(blockpull.ImageLockedError):
            blockpull.open(img)
        a.write(0, b"ok")
    with blockpull.open(img, readonly=True), blockpull.open(img, readonly=True) as b:
        assert b.read(0, 2) == b"ok"
