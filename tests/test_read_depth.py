"""Several chunk reads in flight (``read_depth``): guest writes into ranges being read,
pause/resume/abort while reads are in flight, and a failed read among several, judged by
qemu-img (compare against the expected data, check clean)."""
import errno
import os
import random
import threading

import pytest

import blockpull
import blockpull.job
from blockpull import faults
from blockpull._stream import Stream

MiB = 1 << 20
CHUNK = 512 * 1024
SIZE = 8 * MiB
WAIT = 60       # seconds before a wait that should end at once counts as a hang


@pytest.fixture
def reads_ahead(monkeypatch):
    """Pulls made from here on copy in 512 KiB chunks, sync every 2 MiB and keep
    ``read_depth`` (4) chunk reads in flight."""
    opts = {"read_depth": 4}

    def make(*a, **kw):
        s = Stream(*a, chunk=CHUNK, batch=4 * CHUNK, **kw)
        s.read_depth = opts["read_depth"]
        return s
    monkeypatch.setattr(blockpull.job, "Stream", make)
    return opts


def _chain(qemu, tmp_path, fmt):
    """base (all data) <- mid (some clusters, a zero run) <- top (empty): the top's
    path; the whole chain as raw in ``tmp_path/chain.raw``."""
    base, mid, top = (str(tmp_path / f"{n}.{fmt}") for n in ("base", "mid", "top"))
    qemu.create(base, SIZE, fmt=fmt)
    qemu.io(base, f"write -P 7 0 {SIZE}", fmt=fmt)
    qemu.create(mid, SIZE, fmt=fmt, backing=os.path.basename(base), backing_fmt=fmt)
    qemu.io(mid, *[f"write -P {20 + i} {o} 65536" for i, o in
                   enumerate(range(3 * 65536, SIZE, 9 * 65536))], f"write -z {MiB} {MiB}",
            fmt=fmt)
    qemu.create(top, SIZE, fmt=fmt, backing=os.path.basename(mid), backing_fmt=fmt)
    qemu.img("convert", "-O", "raw", top, str(tmp_path / "chain.raw"))
    return top


def _on_reader_thread():
    return threading.current_thread().name.startswith("blockpull-pull-read")


class ReadGate(faults.FaultInjector):
    """Holds the pull's reader threads at their backing reads until ``go`` is set, and
    counts the readers held at once (``held``, ``most``) and the backing reads made on
    them (``reads``)."""

    def __init__(self):
        super().__init__(record_writes=False)
        self.go = threading.Event()
        self.cond = threading.Condition()
        self.held = 0
        self.most = 0
        self.reads = 0

    def check(self, op, role, offset, length):
        if op == "read" and role == "backing" and _on_reader_thread():
            with self.cond:
                self.reads += 1
                self.held += 1
                self.most = max(self.most, self.held)
                self.cond.notify_all()
            self.go.wait(WAIT)
            with self.cond:
                self.held -= 1
        return super().check(op, role, offset, length)

    def wait_held(self, n):
        with self.cond:
            assert self.cond.wait_for(lambda: self.held >= n, WAIT), \
                f"{self.held} reads in flight, waited for {n}"


def _attach_backing(img, inj):
    """``inj`` on the backing files only (the pull's readers take it from them)."""
    for f in faults.files_of(img):
        if f.role == "backing":
            f.faults = inj


def _expect(tmp_path, writes):
    """The chain's data with ``writes`` ((offset, bytes), in order) over it."""
    with open(tmp_path / "chain.raw", "rb") as f:
        data = bytearray(f.read())
    for off, b in writes:
        data[off:off + len(b)] = b
    path = tmp_path / "expect.raw"
    path.write_bytes(bytes(data))
    return str(path)


def _judge(qemu, top, expect, fmt, backed=False):
    assert qemu.compare(top, expect, fa=fmt, fb="raw"), "data differs from the expected"
    qemu.assert_clean(top, fmt)
    backing = qemu.info(top).get("backing-filename")
    assert (backing is not None) == backed, backing


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_guest_writes_into_ranges_being_read(qemu, tmp_path, reads_ahead, fmt):
    """Guest writes (unaligned, partial clusters) into the chunks whose reads are in
    flight win: the pull keeps only what the top still lacks when the reads complete."""
    top = _chain(qemu, tmp_path, fmt)
    gate = ReadGate()
    writes = [(CHUNK * k + 1000 * k + 123, bytes([0x40 + k]) * (70000 + 4096 * k))
              for k in range(4)]
    writes.append((CHUNK - 5000, b"\xee" * 10000))     # across two chunks being read
    with blockpull.open(top) as img:
        _attach_backing(img, gate)
        job = img.pull()
        try:
            gate.wait_held(reads_ahead["read_depth"])
            for off, b in writes:
                img.write(off, b)
        finally:
            gate.go.set()
        info = job.result(timeout=WAIT)
        assert info.cur == info.end
        faults.detach(img)
    assert gate.most == reads_ahead["read_depth"]
    _judge(qemu, top, _expect(tmp_path, writes), fmt)


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_guest_writes_racing_reads_ahead(qemu, tmp_path, reads_ahead, fmt):
    """A guest writing all over the disk while the pull runs with reads in flight: the
    result is the chain with every write over it."""
    top = _chain(qemu, tmp_path, fmt)
    rng = random.Random(5)
    writes = []
    for k in range(60):
        off = rng.randrange(0, SIZE - 200000)
        writes.append((off, bytes([k % 250 + 1]) * rng.randrange(1, 200000)))
    with blockpull.open(top) as img:
        job = img.pull()
        for off, b in writes:
            img.write(off, b)
        info = job.result(timeout=WAIT)
        assert info.cur == info.end
    _judge(qemu, top, _expect(tmp_path, writes), fmt)


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_copy_on_read_of_ranges_being_read(qemu, tmp_path, reads_ahead, fmt):
    """Guest reads with copy-on-read of the chunks whose reads are in flight copy them
    into the top at once (they do not wait for the pull); the pull then leaves those
    clusters alone: the result reads as the chain and checks clean."""
    top = _chain(qemu, tmp_path, fmt)
    gate = ReadGate()
    with open(tmp_path / "chain.raw", "rb") as f:
        chain = f.read()
    with blockpull.open(top, copy_on_read=True) as img:
        _attach_backing(img, gate)
        job = img.pull()
        try:
            gate.wait_held(reads_ahead["read_depth"])
            for off, n in ((0, 3 * CHUNK), (CHUNK + 777, 5000), (2 * CHUNK - 100, 200)):
                assert img.read(off, n) == chain[off:off + n]
            held = gate.held
        finally:
            gate.go.set()
        assert held == reads_ahead["read_depth"], "a guest read waited for the pull"
        info = job.result(timeout=WAIT)
        assert info.cur == info.end
        faults.detach(img)
    _judge(qemu, top, _expect(tmp_path, []), fmt)


def test_pause_waits_for_reads_in_flight_then_reads_nothing(qemu, tmp_path, reads_ahead):
    """A pause asked while reads are in flight parks once they are done; nothing more is
    read from the backing chain while paused; resume completes the pull."""
    top = _chain(qemu, tmp_path, "qcow2")
    gate = ReadGate()
    with blockpull.open(top) as img:
        _attach_backing(img, gate)
        job = img.pull()
        gate.wait_held(2)
        job.pause(wait=False)
        gate.go.set()
        job.pause()         # returns once parked
        assert job.status == "paused"
        reads = gate.reads
        img.read(0, SIZE)   # a guest read meanwhile (the image's drivers, not the pull's)
        assert gate.reads == reads, "the pull read while paused"
        assert job.info().cur < job.info().end
        job.resume()
        info = job.result(timeout=WAIT)
        assert info.cur == info.end
        faults.detach(img)
    _judge(qemu, top, _expect(tmp_path, []), "qcow2")


def test_abort_with_reads_in_flight(qemu, tmp_path, reads_ahead):
    """An abort while reads are in flight: the job ends cancelled once they are done, no
    reader thread is left, the image is valid, still backed, and reads as the chain; a
    later pull completes it."""
    top = _chain(qemu, tmp_path, "qcow2")
    gate = ReadGate()
    with blockpull.open(top) as img:
        _attach_backing(img, gate)
        job = img.pull()
        gate.wait_held(2)
        job.abort(wait=False)
        gate.go.set()
        with pytest.raises(blockpull.PullCancelled):
            job.result(timeout=WAIT)
        assert not [t for t in threading.enumerate()
                    if t.name.startswith("blockpull-pull-read")]
        faults.detach(img)
    _judge(qemu, top, _expect(tmp_path, []), "qcow2", backed=True)
    with blockpull.open(top) as img:
        img.pull().result(timeout=WAIT)
    _judge(qemu, top, _expect(tmp_path, []), "qcow2")


@pytest.mark.parametrize("policy", ["report", "stop", "ignore"])
@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_read_error_among_reads_in_flight(qemu, tmp_path, reads_ahead, fmt, policy):
    """The 3rd backing read of the pull's readers fails while others are in flight:
    handled under the job's policy as a single read was (report: the job fails; stop:
    it pauses and a resume completes it; ignore: the rest is copied and the job fails
    with the backing kept); the data always reads as the chain."""
    top = _chain(qemu, tmp_path, fmt)
    gate = ReadGate()
    gate.go.set()
    rule = gate.fail("read", "backing", errno.EIO, nth=3,
                     match=lambda *a: _on_reader_thread())
    with blockpull.open(top) as img:
        _attach_backing(img, gate)
        job = img.pull(on_error=policy)
        if policy == "stop":
            for _ in range(WAIT * 100):
                if job.status == "paused" or job.done():
                    break
                job.wait(0.01)
            assert job.status == "paused", job.info()
            job.resume()
            info = job.result(timeout=WAIT)
            assert info.cur == info.end
        else:
            with pytest.raises(blockpull.PullError) as ei:
                job.result(timeout=WAIT)
            assert ei.value.errno == errno.EIO and ei.value.operation == "read"
        assert rule.fired == 1
        faults.detach(img)
    _judge(qemu, top, _expect(tmp_path, []), fmt, backed=policy != "stop")


def test_read_depth_knob(qemu, tmp_path):
    """``Image.pull(read_depth=2)`` keeps two chunk reads in flight, no more; a value out
    of range is refused with ValueError before any job runs."""
    top = _chain(qemu, tmp_path, "qcow2")
    gate = ReadGate()
    with blockpull.open(top) as img:
        for bad in (0, -1, 10 ** 6):
            with pytest.raises(ValueError, match="read_depth"):
                img.pull(read_depth=bad)
        assert img.job is None or img.job.done()
        _attach_backing(img, gate)
        job = img.pull(read_depth=2, chunk=CHUNK)
        try:
            gate.wait_held(2)
        finally:
            gate.go.set()
        job.result(timeout=WAIT)
        faults.detach(img)
    assert gate.most == 2
    _judge(qemu, top, _expect(tmp_path, []), "qcow2")


def test_sequential_hint(tmp_path):
    """The pull's own descriptors of backing files ask the kernel to read ahead
    (``File.advise_sequential``, POSIX_FADV_SEQUENTIAL): it takes on a regular file, is
    refused (False, no exception) where there is nothing to read ahead, and a closed file
    raises as every other call on it does."""
    from blockpull._fileio import File
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    f = File(str(p))
    assert f.advise_sequential() is True
    assert f.pread(0, 4096) == b"x" * 4096
    f.close()
    with pytest.raises(ValueError):
        f.advise_sequential()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    g = File(str(fifo), writable=True)      # O_RDWR: a FIFO opens without a peer
    try:
        assert g.advise_sequential() is False
    finally:
        g.close()
