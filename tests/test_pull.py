"""The pull job, judged by qemu-img check, compare and info."""
import asyncio
import os
import random
import threading
import time

import pytest

import blockpull


def pulled_ok(qemu, path, want_raw, backing=None):
    qemu.assert_clean(path)
    assert qemu.compare(path, want_raw, None, "raw"), "pulled image differs from its chain"
    info = qemu.info(path)
    assert info.get("backing-filename") == backing
    return info


@pytest.mark.parametrize("base", [None, "base.qcow2", "mid.qcow2"])
def test_pull_chain3(tmp_path, qemu, chain3, base):
    top, mid, basep = chain3
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top) as img:
        job = img.pull(base=base)
        info = job.result(timeout=60)
        assert info.status == "completed"
        assert info.cur == info.end
        assert img.read(0, img.size) == want.read_bytes()
        assert img.backing == (None if base is None else str(tmp_path / base))
    info = pulled_ok(qemu, top, want, base)
    if base:
        assert info["backing-filename-format"] == "qcow2"


def test_noop_pull_changes_nothing(tmp_path, qemu, chain3):
    top, mid, base = chain3
    before = open(top, "rb").read()
    with blockpull.open(top) as img:
        info = img.pull(base="mid.qcow2").result(timeout=30)
    assert info.end == 0 and info.cur == 0
    assert open(top, "rb").read() == before


def test_pull_intermediate_image(tmp_path, qemu, chain3):
    top, mid, base = chain3
    want_top = tmp_path / "top.raw"
    want_mid = tmp_path / "mid.raw"
    qemu.to_raw(top, want_top)
    qemu.to_raw(mid, want_mid)
    blockpull.pull(mid)
    pulled_ok(qemu, mid, want_mid, None)
    assert qemu.compare(top, want_top, None, "raw")


def test_base_by_absolute_path_and_relative_name(tmp_path, qemu, chain3):
    top, mid, base = chain3
    with blockpull.open(top) as img:
        assert img.base_depth(base) == 2
        assert img.base_depth("base.qcow2") == 2
        with pytest.raises(blockpull.BackingChainError):
            img.base_depth(str(tmp_path / "other.qcow2"))


@pytest.mark.parametrize("top_size,base_size", [(8 << 20, 3 << 20), (2 << 20, 6 << 20)])
def test_size_mismatch(tmp_path, qemu, top_size, base_size):
    base = qemu.create(tmp_path / "b.qcow2", base_size)
    qemu.io(base, f"write -P 1 0 {base_size}")
    top = qemu.create(tmp_path / "t.qcow2", top_size, backing="b.qcow2")
    qemu.io(top, "write -P 2 64k 64k")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    info = blockpull.pull(top)
    assert info.cur == info.end == min(top_size, base_size) - (64 << 10)
    pulled_ok(qemu, top, want)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_zeros_over_base_survive_partial_pull(tmp_path, qemu, compat):
    o = [f"compat={compat}"]
    base = qemu.create(tmp_path / "b.qcow2", 4 << 20, opts=o)
    qemu.io(base, "write -P 1 0 4M")
    mid = qemu.create(tmp_path / "m.qcow2", 4 << 20, backing="b.qcow2", opts=o)
    # a zeroed cluster and a range written with zero bytes, both over base data
    qemu.io(mid, "write -z 1M 64k", "write -P 0 2M 128k", "write -P 3 3M 64k")
    top = qemu.create(tmp_path / "t.qcow2", 4 << 20, backing="m.qcow2", opts=o)
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    blockpull.pull(top, base="b.qcow2")
    pulled_ok(qemu, top, want, "b.qcow2")


def test_whole_pull_leaves_zeros_unallocated(tmp_path, qemu):
    base = qemu.create(tmp_path / "b.qcow2", 8 << 20)
    qemu.io(base, "write -P 0 0 4M", "write -P 5 4M 1M")
    top = qemu.create(tmp_path / "t.qcow2", 8 << 20, backing="b.qcow2")
    info = blockpull.pull(top)
    assert info.copied_bytes == 1 << 20
    assert os.path.getsize(top) < 2 << 20


def test_raw_and_compressed_backings(tmp_path, qemu):
    raw = tmp_path / "base.raw"
    raw.write_bytes(os.urandom(1 << 20) + bytes(1 << 20) + b"\x33" * (1 << 20))
    comp = tmp_path / "comp.qcow2"
    qemu.img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "backing_file=base.raw,backing_fmt=raw",
             str(raw), str(comp))
    mid = qemu.create(tmp_path / "mid.qcow2", 3 << 20, backing="base.raw", backing_fmt="raw")
    qemu.io(mid, "write -P 7 100k 300k")
    top = qemu.create(tmp_path / "top.qcow2", 3 << 20, backing="mid.qcow2")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    blockpull.pull(top)
    pulled_ok(qemu, top, want)
    # a compressed image as the backing
    c = tmp_path / "c.qcow2"
    qemu.img("convert", "-c", "-O", "qcow2", str(raw), str(c))
    t2 = qemu.create(tmp_path / "t2.qcow2", 3 << 20, backing="c.qcow2")
    blockpull.pull(t2)
    pulled_ok(qemu, t2, raw)


def test_v2_top_over_v3_base_with_different_cluster_sizes(tmp_path, qemu):
    base = qemu.create(tmp_path / "b.qcow2", 5 << 20, opts=["cluster_size=4096"])
    qemu.io(base, "write -P 1 1000 3M", "write -z 100k 8k")
    mid = qemu.create(tmp_path / "m.qcow2", 5 << 20, backing="b.qcow2", opts=["cluster_size=2M"])
    qemu.io(mid, "write -P 2 3M 100")
    top = qemu.create(tmp_path / "t.qcow2", 5 << 20, backing="m.qcow2",
                      opts=["cluster_size=512,compat=0.10"])
    qemu.io(top, "write -P 3 5000 5000")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    blockpull.pull(top, base="b.qcow2")
    pulled_ok(qemu, top, want, "b.qcow2")


def dense_chain(tmp_path, qemu, size=32 << 20):
    base = qemu.create(tmp_path / "b.qcow2", size)
    raw = tmp_path / "seed.raw"
    raw.write_bytes(random.Random(7).randbytes(size))
    qemu.img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    top = qemu.create(tmp_path / "t.qcow2", size, backing="b.qcow2")
    qemu.io(top, "write -P 9 1M 1M")
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    return top, want


def test_abort_then_pull_again_resumes(tmp_path, qemu):
    top, want = dense_chain(tmp_path, qemu)
    rng = random.Random(3)
    copied_total = 0
    for round_ in range(3):
        with blockpull.open(top) as img:
            job = img.pull(bandwidth="16M")
            time.sleep(rng.uniform(0.05, 0.3))
            job.abort()
            assert job.status == "cancelled"
            with pytest.raises(blockpull.PullCancelled):
                job.result()
            cur = job.info().cur
            copied_total += job.info().copied_bytes
            assert img.backing is not None
        assert qemu.check(top) == 0
        assert qemu.compare(top, want, None, "raw")
        assert qemu.info(top)["backing-filename"] == "b.qcow2"
    with blockpull.open(top) as img:
        job = img.pull()
        info = job.result(timeout=60)
    # the last pull copied only what the aborted ones had not
    assert info.copied_bytes + copied_total == (31 << 20)
    pulled_ok(qemu, top, want)


def test_pause_stops_progress_and_events_arrive_once(tmp_path, qemu):
    top, want = dense_chain(tmp_path, qemu)
    events = []
    threads = set()
    in_job = []

    def on_event(ev):
        events.append(ev.kind)
        threads.add(threading.current_thread().name)
        in_job.append(ev.job.in_job_thread())

    with blockpull.open(top) as img:
        job = img.pull(bandwidth="20M", on_event=on_event)
        time.sleep(0.2)
        job.pause()
        assert job.status == "paused"
        cur = job.info().cur
        time.sleep(0.4)
        assert job.info().cur == cur
        job.resume()
        job.set_speed(0)
        info = job.result(timeout=60)
    assert events == ["paused", "resumed", "completed"]
    assert len(threads) == 1 and in_job and all(in_job)    # the job's own thread
    assert info.cur == info.end
    pulled_ok(qemu, top, want)


def test_set_speed_applies_at_once(tmp_path, qemu):
    top, want = dense_chain(tmp_path, qemu)
    with blockpull.open(top) as img:
        job = img.pull(bandwidth="1M")
        time.sleep(0.3)
        slow = job.info().cur
        assert slow <= 2 << 20
        t0 = time.monotonic()
        job.set_speed("0")
        job.result(timeout=60)
        assert time.monotonic() - t0 < 20
        assert job.info().bandwidth == 0
    pulled_ok(qemu, top, want)


def test_await_job(tmp_path, qemu, chain3):
    top, _, _ = chain3

    async def main():
        with blockpull.open(top) as img:
            return await img.pull()

    info = asyncio.run(main())
    assert info.status == "completed"


def test_one_job_per_image(tmp_path, qemu):
    top, want = dense_chain(tmp_path, qemu)
    with blockpull.open(top) as img:
        job = img.pull(bandwidth="4M")
        with pytest.raises(blockpull.JobActiveError):
            img.pull()
        job.abort()
        img.pull().result(timeout=60)
    pulled_ok(qemu, top, want)


def test_done_callback_and_wait(tmp_path, qemu, chain3):
    top, _, _ = chain3
    seen = []
    with blockpull.open(top) as img:
        job = img.pull()
        job.add_done_callback(lambda j: seen.append(j.status))
        assert job.wait(30)
        assert job.done()
        job.add_done_callback(lambda j: seen.append("late"))
    assert seen == ["completed", "late"]


def test_guest_writes_during_pull_survive(tmp_path, qemu):
    top, want = dense_chain(tmp_path, qemu)
    model = bytearray(want.read_bytes())
    size = len(model)
    rng = random.Random(11)
    with blockpull.open(top) as img:
        job = img.pull(bandwidth="40M")
        stop = threading.Event()
        lock = threading.Lock()

        def writer(seed):
            r = random.Random(seed)
            while not stop.is_set():
                off = r.randrange(size - 70000)
                n = r.randrange(1, 70000)
                data = r.randbytes(n)
                with lock:
                    img.write(off, data)
                    model[off:off + n] = data

        ts = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
        for t in ts:
            t.start()
        job.wait(60)
        stop.set()
        for t in ts:
            t.join()
        assert job.result().status == "completed"
        assert img.read(0, size) == bytes(model)
    want.write_bytes(model)
    pulled_ok(qemu, top, want)


def test_copy_on_read(tmp_path, qemu, chain3):
    top, _, _ = chain3
    want = tmp_path / "want.raw"
    qemu.to_raw(top, want)
    with blockpull.open(top, copy_on_read=True) as img:
        data = img.read(0, img.size)
    assert data == want.read_bytes()
    qemu.assert_clean(top)
    # everything non-zero now lives in the top: dropping the backing changes nothing
    qemu.img("rebase", "-u", "-b", "", top)
    assert qemu.compare(top, want, None, "raw")


def test_one_shot_pull_progress(tmp_path, qemu, chain3):
    top, _, _ = chain3
    seen = []
    info = blockpull.pull(top, progress=seen.append)
    assert seen and seen[-1].cur == seen[-1].end == info.end
    assert qemu.info(top).get("backing-filename") is None


def test_libvirt_shaped_api(tmp_path, qemu):
    top, want = dense_chain(tmp_path, qemu)
    got = []
    done = threading.Event()

    def cb(path, status):
        got.append((path, status))
        done.set()

    eid = blockpull.event_register(blockpull.EVENT_ID_BLOCK_PULL, cb)
    try:
        assert blockpull.block_pull(top, 4) == 0  # 4 MiB/s
        time.sleep(0.2)
        i = blockpull.get_block_pull_info(top)
        assert 0 < i.end and i.cur <= i.end
        assert blockpull.block_pull_abort(top) == 0
        assert done.wait(10)
        assert got == [(os.path.abspath(top), blockpull.BLOCK_PULL_CANCELED)]
        done.clear()
        assert blockpull.block_pull(top, 1 << 20, blockpull.BLOCK_PULL_BANDWIDTH_BYTES) == 0
        assert blockpull.block_job_set_speed(top, 0) == 0
        assert done.wait(60)
        assert got[-1][1] == blockpull.BLOCK_PULL_COMPLETED
        i = blockpull.get_block_pull_info(top)
        assert i.cur == i.end
    finally:
        blockpull.event_deregister(eid)
    pulled_ok(qemu, top, want)


def test_bad_arguments(tmp_path, qemu, chain3):
    top, _, _ = chain3
    with blockpull.open(top) as img:
        with pytest.raises(ValueError):
            img.pull(on_error="sometimes")
        with pytest.raises(ValueError):
            img.pull(bandwidth="fast")
        with pytest.raises(blockpull.BackingChainError):
            img.pull(base="nonexistent.qcow2")
    with blockpull.open(top, readonly=True) as img:
        with pytest.raises(PermissionError):
            img.pull()


@pytest.mark.parametrize("base", [None, "b.qed"])
def test_qed_chain_pull(tmp_path, qemu, base):
    b = qemu.create(tmp_path / "b.qed", 6 << 20, fmt="qed")
    qemu.io(b, "write -P 1 0 5M", fmt="qed")
    m = qemu.create(tmp_path / "m.qed", 6 << 20, fmt="qed", backing="b.qed", backing_fmt="qed")
    qemu.io(m, "write -P 2 1M 1M", "write -z 3M 64k", "write -P 0 4M 64k", fmt="qed")
    t = qemu.create(tmp_path / "t.qed", 6 << 20, fmt="qed", backing="m.qed", backing_fmt="qed")
    qemu.io(t, "write -P 3 100k 10k", fmt="qed")
    want = tmp_path / "want.raw"
    qemu.to_raw(t, want)
    # QED records no backing format beyond "raw": it is named, never guessed
    with blockpull.open(t, backing_format="qed") as img:
        info = img.pull(base=base).result(timeout=60)
    assert info.cur == info.end
    assert qemu.check(t) == 0
    assert qemu.compare(t, want, "qed", "raw")
    assert qemu.info(t).get("backing-filename") == base


def test_qed_over_raw_and_compressed(tmp_path, qemu):
    raw = tmp_path / "base.raw"
    raw.write_bytes(random.Random(5).randbytes(2 << 20) + bytes(1 << 20))
    t = qemu.create(tmp_path / "t.qed", 3 << 20, fmt="qed", backing="base.raw", backing_fmt="raw")
    qemu.io(t, "write -P 9 1M 4k", fmt="qed")
    want = tmp_path / "want.raw"
    qemu.to_raw(t, want)
    blockpull.pull(t)
    assert qemu.check(t) == 0
    assert qemu.compare(t, want, "qed", "raw")
    # a zlib-compressed qcow2 under a QED top
    c = tmp_path / "c.qcow2"
    qemu.img("convert", "-c", "-O", "qcow2", "-f", "raw", str(raw), str(c))
    t2 = qemu.create(tmp_path / "t2.qed", 3 << 20, fmt="qed", backing="c.qcow2", backing_fmt="qcow2")
    with blockpull.open(t2, backing_format="qcow2") as img:
        img.pull().result(timeout=60)
    assert qemu.check(t2) == 0
    assert qemu.compare(t2, raw, "qed", "raw")


def test_qcow2_v2_chain_partial_pull_with_raw_base(tmp_path, qemu):
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x11" * (2 << 20))
    o = ["compat=0.10"]
    m = qemu.create(tmp_path / "m.qcow2", 2 << 20, backing="base.raw", backing_fmt="raw", opts=o)
    qemu.io(m, "write -z 0 64k", "write -P 2 1M 100k")
    t = qemu.create(tmp_path / "t.qcow2", 2 << 20, backing="m.qcow2", opts=o)
    want = tmp_path / "want.raw"
    qemu.to_raw(t, want)
    blockpull.pull(t, base=str(raw))
    info = pulled_ok(qemu, t, want, "base.raw")
    assert info["backing-filename-format"] == "raw"
