"""The pipelined copy loop (read ahead while the last chunk is written, direct data writes),
judged by qemu-img: pulled images compare equal to their chain and check clean."""
import os
import threading

import pytest

import blockpull
import blockpull.job
from blockpull._stream import Stream


@pytest.fixture
def small_chunks(monkeypatch):
    """Pulls made from here on copy in 1 MiB chunks and sync every 4 MiB, so that even a
    small chain goes through the pipeline many times; ``direct`` sets the write path,
    ``depth`` the chunk writes in flight."""
    opts = {"direct": True, "depth": 2}

    def make(*a, **kw):
        s = Stream(*a, chunk=1 << 20, batch=4 << 20, **kw)
        s.direct = opts["direct"]
        s.depth = opts["depth"]
        return s
    monkeypatch.setattr(blockpull.job, "Stream", make)
    return opts


def _pull(path, **kw):
    with blockpull.open(path) as img:
        return img.pull(**kw).result()


def _chain(qemu, tmp_path, size, cs=65536, compat="1.1", layers=3):
    opts = [f"cluster_size={cs},compat={compat}"]
    names = [str(tmp_path / f"l{i}.qcow2") for i in range(layers)]
    qemu.create(names[0], size, opts=opts)
    qemu.io(names[0], f"write -P 1 0 {size}")
    for i in range(1, layers):
        qemu.create(names[i], size, backing=os.path.basename(names[i - 1]), opts=opts)
        if i < layers - 1:
            step = max(cs, size // 37)
            cmds = [f"write -P {10 + i} {o} {cs}" for o in range(i * cs, size - cs, step)]
            cmds.append(f"write -z {3 * cs} {cs}")
            qemu.io(names[i], *cmds)
    return names


@pytest.mark.parametrize("cs", [512, 4096, 65536, 2 << 20])
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("depth", [1, 3])
def test_pull_many_chunks_matches_chain(tmp_path, qemu, small_chunks, cs, compat, depth):
    small_chunks["depth"] = depth
    size = 24 << 20
    names = _chain(qemu, tmp_path, size, cs, compat)
    top = names[-1]
    ref = tmp_path / "ref.raw"
    qemu.img("convert", "-O", "raw", top, str(ref))
    with blockpull.open(top) as img:
        info = img.pull().result()
    assert info.cur == info.end
    qemu.assert_clean(top)
    assert qemu.compare(top, ref, "qcow2", "raw")
    assert "backing-filename" not in qemu.info(top)


def test_pull_with_base_keeps_zeros(tmp_path, qemu, small_chunks):
    size = 16 << 20
    names = _chain(qemu, tmp_path, size, layers=4)
    top = names[-1]
    ref = tmp_path / "ref.raw"
    qemu.img("convert", "-O", "raw", top, str(ref))
    _pull(top, base=names[0])
    qemu.assert_clean(top)
    assert qemu.compare(top, ref, "qcow2", "raw")
    assert qemu.info(top)["backing-filename"] == os.path.basename(names[0])


def test_buffered_path_matches_direct(tmp_path, qemu, small_chunks):
    """With direct writes turned off the loop writes through the page cache: same result."""
    size = 8 << 20
    names = _chain(qemu, tmp_path, size)
    top = names[-1]
    ref = tmp_path / "ref.raw"
    qemu.img("convert", "-O", "raw", top, str(ref))
    small_chunks["direct"] = False
    _pull(top)
    qemu.assert_clean(top)
    assert qemu.compare(top, ref, "qcow2", "raw")


def test_guest_writes_during_pull_win(tmp_path, qemu, small_chunks):
    size = 32 << 20
    names = _chain(qemu, tmp_path, size)
    top = names[-1]
    model = bytearray(qemu.to_raw(top, tmp_path / "before.raw"))
    stop = threading.Event()
    with blockpull.open(top) as img:
        job = img.pull(bandwidth=64 << 20)

        def writer():
            i = 0
            while not stop.is_set() and i < 200:
                off = (i * 7919 * 4096) % (size - 8192)
                data = bytes([i % 250 + 3]) * 5000
                img.write(off, data)
                model[off:off + len(data)] = data
                i += 1
        t = threading.Thread(target=writer)
        t.start()
        job.wait()
        stop.set()
        t.join()
        job.result()
    (tmp_path / "model.raw").write_bytes(model)
    qemu.assert_clean(top)
    assert qemu.compare(top, tmp_path / "model.raw", "qcow2", "raw")


def test_abort_then_pull_again(tmp_path, qemu, small_chunks):
    size = 32 << 20
    names = _chain(qemu, tmp_path, size)
    top = names[-1]
    ref = tmp_path / "ref.raw"
    qemu.img("convert", "-O", "raw", top, str(ref))
    with blockpull.open(top) as img:
        job = img.pull(bandwidth=16 << 20)
        while job.info().cur < (4 << 20) and not job.done():
            job.wait(0.01)
        job.abort()
        assert job.status == "cancelled"
    qemu.assert_clean(top)
    assert qemu.compare(top, ref, "qcow2", "raw")
    _pull(top)
    qemu.assert_clean(top)
    assert qemu.compare(top, ref, "qcow2", "raw")


class _FailNthWrite:
    """Fault layer: EIO on the n-th data write to the top (large writes only)."""

    def __init__(self, n):
        self.n = n
        self.seen = 0

    def check(self, op, role, off, length):
        if op == "write" and role == "top" and length >= 65536:
            self.seen += 1
            if self.seen == self.n:
                return 5
        return 0

    def record(self, *a):
        pass


@pytest.mark.parametrize("nth", [1, 3])
@pytest.mark.parametrize("depth", [1, 3])
def test_write_error_fails_cleanly_and_resumes(tmp_path, qemu, small_chunks, nth, depth):
    small_chunks["depth"] = depth
    size = 16 << 20
    names = _chain(qemu, tmp_path, size)
    top = names[-1]
    ref = tmp_path / "ref.raw"
    qemu.img("convert", "-O", "raw", top, str(ref))
    with blockpull.open(top) as img:
        img.layers[0].file.faults = _FailNthWrite(nth)
        job = img.pull()
        with pytest.raises(blockpull.PullError):
            job.result()
        img.layers[0].file.faults = None
    assert qemu.info(top).get("backing-filename")
    assert qemu.check(top) in (0, 3)
    assert qemu.compare(top, ref, "qcow2", "raw")
    _pull(top)
    assert qemu.check(top) in (0, 3)
    assert qemu.compare(top, ref, "qcow2", "raw")


def test_write_error_ignored_skips_one_chunk(tmp_path, qemu, small_chunks):
    size = 16 << 20
    names = _chain(qemu, tmp_path, size)
    top = names[-1]
    ref = tmp_path / "ref.raw"
    qemu.img("convert", "-O", "raw", top, str(ref))
    with blockpull.open(top) as img:
        img.layers[0].file.faults = _FailNthWrite(2)
        job = img.pull(on_error="ignore")
        with pytest.raises(blockpull.PullError):
            job.result()
        assert job.info().errors == 1
        img.layers[0].file.faults = None
    assert qemu.compare(top, ref, "qcow2", "raw")
    _pull(top)
    assert qemu.compare(top, ref, "qcow2", "raw")
    assert "backing-filename" not in qemu.info(top)


@pytest.mark.parametrize("cs", [4096, 65536])
def test_copy_on_read_fills_top(tmp_path, qemu, cs):
    """Reads with copy-on-read (aligned, unaligned, partly covered clusters) return the
    chain's data and leave it in the top; a pull afterwards has less to copy."""
    size = 8 << 20
    names = _chain(qemu, tmp_path, size, cs)
    top = names[-1]
    ref = tmp_path / "ref.raw"
    model = qemu.to_raw(top, ref)
    import mmap
    aligned = mmap.mmap(-1, 1 << 20)
    with blockpull.open(top, copy_on_read=True) as img:
        img.readinto(0, memoryview(aligned)[:1 << 20])
        assert bytes(aligned[:1 << 20]) == model[:1 << 20]
        for off, n in [(1234567, 300000), (3 << 20, 5), (5 << 20, 2 << 20), (size - 777, 777)]:
            assert img.read(off, n) == model[off:off + n]
    qemu.assert_clean(top)
    assert qemu.compare(top, ref, "qcow2", "raw")
    in_top = sum(e["length"] for e in qemu.map(top) if e["depth"] == 0 and e["data"])
    assert in_top >= 3 << 20
    with blockpull.open(top) as img:
        info = img.pull().result()
    assert info.copied_bytes < size - (3 << 20)
    qemu.assert_clean(top)
    assert qemu.compare(top, ref, "qcow2", "raw")


@pytest.mark.parametrize("fmt", ["qcow2", "qed"])
def test_chunks_are_read_without_the_image_lock(qemu, tmp_path, fmt):
    """The pull reads each chunk from the backing chain without holding the image lock
    (readers of the image never wait for a chunk's read), through descriptors of its
    own on the same files; guest writes racing those reads still win. Judged by every
    chunk-sized backing read (an observer on the image's backing files, as fault
    injection attaches) and by the pulled image against a model."""
    size = 16 << 20
    base = qemu.create(str(tmp_path / "base.qcow2"), size)
    qemu.io(base, f"write -P 1 0 {size}")
    top = qemu.create(str(tmp_path / f"top.{fmt}"), size, fmt=fmt, backing="base.qcow2",
                      backing_fmt="qcow2")
    want = bytearray(b"\1" * size)

    class Observer:
        def __init__(self, img):
            self.img = img
            self.reads = []      # (lock held by the reading thread, descriptor's path)
            self.wrote = 0

        def check(self, op, role, off, n):
            if op == "read" and role == "backing" and n >= 1 << 20:
                self.reads.append(self.img.lock._is_owned())
                if self.wrote < 16:
                    # a guest write lands in the chunk while the pull reads it
                    o = off + 4096 * (self.wrote % 4)
                    pat = 2 + self.wrote
                    self.img.write(o, bytes([pat]) * 4096)
                    want[o:o + 4096] = bytes([pat]) * 4096
                    self.wrote += 1
            return 0

        def record(self, op, path, off, data):
            pass

    with blockpull.open(top) as img:
        obs = Observer(img)
        for d in img.layers[1:]:
            d.file.faults = obs
        img.pull(chunk=1 << 20).result()
        for d in img.layers[1:]:
            d.file.faults = None
    assert obs.reads and not any(obs.reads), obs.reads
    assert obs.wrote == 16
    assert qemu.info(top).get("backing-filename") is None
    qemu.assert_clean(top, fmt)
    assert qemu.to_raw(top, str(tmp_path / "out.raw")) == bytes(want)
