"""A failed fdatasync loses what it covered.

After fdatasync fails (EIO; ENOSPC on thin or network storage) Linux may already have
dropped the dirty pages, and a later fdatasync can succeed without writing them. The
power-loss model (``faults.Replayer``) therefore drops the writes made before a failed
sync for good. Each test fails a sync, carries on (resumes the pull, pulls again, or
keeps writing as a guest), records every write and sync, and cuts the power at every
sync point after the failure (and at random instants between): the image must read as
the chain did (guest writes: old or new, flushed ones new), ``qemu-img check`` must
find no corruption, and a flush that failed, or that cannot vouch for what a failed
one lost, must raise.
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

import blockpull
from blockpull import faults
from relhelp import (VARIANTS, Model, Variant, build_chain, copy_chain, qemu_check, raw_of)

CHUNK = 8192
BATCH = 16384

_templates = {}
#: a compressed template pulled with compressed="keep" (the top's type switched to zstd)
KEEP = {"keep-zstd": Variant("keep-zstd", keep="zstd")}


def template(tmp_path_factory, name):
    if name not in _templates:
        v = VARIANTS.get(name) or KEEP[name]
        root = str(tmp_path_factory.mktemp("sf-" + name))
        chain = build_chain(os.path.join(root, "template"), v)
        before = raw_of(chain["top"], os.path.join(root, "before.raw"))
        _templates[name] = (v, chain, before)
    return _templates[name]


def cut_power(top, initial, ops, model, what, budget=40, seed=1):
    """Check the states a power cut after the first failed sync could leave; returns
    how many were checked."""
    rep = faults.Replayer(initial, ops)
    fail_at = next(i for i, o in enumerate(rep.ops) if o.op == "syncfail")
    first_k = sum(1 for o in rep.ops[:fail_at] if o.op == "sync")
    ks = list(range(first_k, rep.nsyncs + 1))
    rng = random.Random(seed)
    if len(ks) > budget // 2:
        ks = sorted(set(ks[:4] + ks[-4:] + rng.sample(ks, budget // 2 - 8)))
    marks = []
    syncs = 0
    for o in ops:
        if o.op == "sync":
            syncs += 1
        elif o.op == "mark":
            marks.append((syncs, o.data))
    # next to the chain, so that either backing link resolves
    path = os.path.join(os.path.dirname(top), "state" + os.path.splitext(top)[1])
    n = 0
    for k in ks:
        start, end = rep.segment(k)
        cands = [(bytes(rep.durable(k)), f"sync {k}/{rep.nsyncs}, nothing after")]
        if end > start:
            cands.append(rep.state(k, rng))
        for data, desc in cands:
            with open(path, "wb") as f:
                f.write(data)
            model.durable = {i for (s, ids) in marks if s <= k for i in ids}
            rc, out = qemu_check(path)
            assert rc in (0, 3), f"{what} ({desc}): qemu-img check exit {rc}\n{out}"
            got = raw_of(path, path + ".raw")
            problem = model.explain(got)
            assert problem is None, f"{what} ({desc}): the disk {problem}"
            n += 1
    return n


def in_job_thread(op, role, offset, length):
    return threading.current_thread().name.startswith("blockpull-pull")


def wait_paused(job):
    t0 = time.monotonic()
    while job.status != "paused":
        assert not job.done(), f"job ended instead of pausing: {job.error!r}"
        assert time.monotonic() - t0 < 60, "job never paused"
        time.sleep(0.005)


def test_replayer_drops_what_a_failed_sync_covered():
    """The model: writes before a failed sync never become durable, not even after a
    later good sync; writes after it do."""
    ops = [faults.Op("write", "f", 0, b"A" * 512),
           faults.Op("syncfail", "f", 0, None),
           faults.Op("write", "f", 512, b"B" * 512),
           faults.Op("sync", "f", 0, None),
           faults.Op("write", "f", 1024, b"C" * 512),
           faults.Op("sync", "f", 0, None)]
    rep = faults.Replayer(bytes(1536), ops)
    assert rep.nsyncs == 2
    assert rep.durable(1) == bytes(512) + b"B" * 512 + bytes(512)
    assert rep.durable(2) == bytes(512) + b"B" * 512 + b"C" * 512
    seen = {bytes(rep.state(0, random.Random(s))[0][:512]) for s in range(40)}
    assert seen == {bytes(512), b"A" * 512}     # before the next good sync: either


@pytest.mark.parametrize("where", ["first", "mid"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_failed_sync_resume_then_power_cut(tmp_path_factory, tmp_path, name, where):
    """on_error="stop": a sync of the pull fails, the job pauses, resumes and completes;
    every power cut from the failure on reads as the chain did."""
    v, tchain, before = template(tmp_path_factory, name)
    d = copy_chain(tchain, str(tmp_path / "img"))
    with open(d["top"], "rb") as f:
        initial = f.read()
    inj = faults.FaultInjector()
    with blockpull.open(d["top"], backing_format="qcow2") as img:
        faults.attach(img, inj)
        rule = inj.fail("sync", "top", errno.EIO, nth=1 if where == "first" else 4,
                        match=in_job_thread)
        job = img.pull(base=v.base, on_error="stop", chunk=CHUNK, batch=BATCH)
        wait_paused(job)
        assert rule.fired == 1
        job.resume()
        job.result(timeout=120)
        faults.detach(img)
    assert raw_of(d["top"], str(tmp_path / "after.raw")) == before
    n = cut_power(d["top"], initial, inj.ops(d["top"]), Model(before),
                  f"{name} {where}")
    assert n > 3


@pytest.mark.parametrize("where", ["first", "mid"])
def test_failed_sync_keep_compressed(tmp_path_factory, tmp_path, where):
    """As above, for a pull that keeps compressed clusters compressed: what a failed
    sync covered (compressed bytes, their links) is given back and copied again; every
    power cut from the failure on reads as the chain did."""
    v, tchain, before = template(tmp_path_factory, "keep-zstd")
    d = copy_chain(tchain, str(tmp_path / "img"))
    with open(d["top"], "rb") as f:
        initial = f.read()
    inj = faults.FaultInjector()
    with blockpull.open(d["top"], backing_format="qcow2") as img:
        faults.attach(img, inj)
        rule = inj.fail("sync", "top", errno.EIO, nth=2 if where == "first" else 5,
                        match=in_job_thread)
        job = img.pull(on_error="stop", chunk=CHUNK * 8, batch=BATCH * 8, compressed="keep")
        wait_paused(job)
        assert rule.fired == 1
        job.resume()
        info = job.result(timeout=120)
        assert info.compressed == "keep" and info.kept_bytes > 0
        faults.detach(img)
    assert raw_of(d["top"], str(tmp_path / "after.raw")) == before
    rc, out = qemu_check(d["top"])
    assert rc == 0 and "compressed clusters" in out, out
    n = cut_power(d["top"], initial, inj.ops(d["top"]), Model(before), f"keep {where}")
    assert n > 3


@pytest.mark.parametrize("name", ["v3", "qed"])
def test_failed_sync_then_next_pull_then_power_cut(tmp_path_factory, tmp_path, name):
    """on_error="report": the job fails on the failed sync; the next pull (same open
    image) copies again what the failed sync covered before linking it."""
    if name not in VARIANTS:
        pytest.skip("no QED driver")
    v, tchain, before = template(tmp_path_factory, name)
    d = copy_chain(tchain, str(tmp_path / "img"))
    with open(d["top"], "rb") as f:
        initial = f.read()
    inj = faults.FaultInjector()
    with blockpull.open(d["top"], backing_format="qcow2") as img:
        faults.attach(img, inj)
        inj.fail("sync", "top", errno.EIO, nth=3, match=in_job_thread)
        with pytest.raises(blockpull.PullError) as ei:
            img.pull(base=v.base, chunk=CHUNK, batch=BATCH).result(timeout=120)
        assert ei.value.errno == errno.EIO
        img.pull(base=v.base, chunk=CHUNK, batch=BATCH).result(timeout=120)
        faults.detach(img)
    assert raw_of(d["top"], str(tmp_path / "after.raw")) == before
    cut_power(d["top"], initial, inj.ops(d["top"]), Model(before), name)


@pytest.mark.parametrize("name", ["v3", "qed"])
def test_guest_flush_failing_during_a_pull(tmp_path_factory, tmp_path, name):
    """A guest's flush fails while a pull runs (the guest wrote nothing): the clusters
    the pull linked since the last good sync are given back and copied again before
    the backing link changes; the guest's later flushes succeed (nothing of its was
    lost)."""
    if name not in VARIANTS:
        pytest.skip("no QED driver")
    v, tchain, before = template(tmp_path_factory, name)
    d = copy_chain(tchain, str(tmp_path / "img"))
    with open(d["top"], "rb") as f:
        initial = f.read()
    inj = faults.FaultInjector()
    with blockpull.open(d["top"], backing_format="qcow2") as img:
        faults.attach(img, inj)
        job = img.pull(base=v.base, chunk=CHUNK, batch=1 << 30)   # no batch sync
        while job.info().cur < job.info().end // 3 and not job.done():
            time.sleep(0.001)
        job.pause()
        rule = inj.fail("sync", "top", errno.EIO,
                        match=lambda *a: threading.current_thread() is threading.main_thread())
        with pytest.raises(OSError) as ei:
            img.flush()
        assert ei.value.errno == errno.EIO and rule.fired == 1
        img.flush()            # nothing of the guest's was lost: this one may succeed
        job.resume()
        job.result(timeout=120)
        faults.detach(img)
    assert raw_of(d["top"], str(tmp_path / "after.raw")) == before
    cut_power(d["top"], initial, inj.ops(d["top"]), Model(before), name)


@pytest.mark.parametrize("name", ["v3", "qed"])
def test_guest_flush_failure_is_not_forgotten(tmp_path_factory, tmp_path, name):
    """Guest writes, then a flush that fails: it raises, and so does every later flush
    (what it lost cannot be written again), close included; a pull still completes.
    After a power cut each write reads old or new, never anything else; the ones
    flushed before read new."""
    if name not in VARIANTS:
        pytest.skip("no QED driver")
    v, tchain, before = template(tmp_path_factory, name)
    d = copy_chain(tchain, str(tmp_path / "img"))
    with open(d["top"], "rb") as f:
        initial = f.read()
    model = Model(before)
    rng = random.Random(5)
    ext = [(100_000, 70_000), (v.size // 2 + 3, 5000), (v.size - 70_000, 65536),
           (9 * v.size // 16, 511)]
    inj = faults.FaultInjector()
    img = blockpull.open(d["top"], backing_format="qcow2")
    faults.attach(img, inj)
    data0 = rng.randbytes(ext[0][1])
    img.write(ext[0][0], data0)
    model.add(ext[0][0], data0)
    img.flush()
    inj.mark((0,))
    for i in (1, 2):
        data = rng.randbytes(ext[i][1])
        img.write(ext[i][0], data)
        model.add(ext[i][0], data)
    inj.fail("sync", "top", errno.EIO)
    with pytest.raises(OSError):
        img.flush()
    data = rng.randbytes(ext[3][1])
    img.write(ext[3][0], data)           # a write after the failure
    model.add(ext[3][0], data)
    for _ in range(2):
        with pytest.raises(OSError) as ei:
            img.flush()                  # the disk is fine now, but writes 1 and 2 may be lost
        assert ei.value.errno == errno.EIO and "earlier fdatasync failed" in str(ei.value)
    # a pull still completes (what it copies is durable), the flush still raises
    img.pull(base=v.base, chunk=CHUNK, batch=BATCH).result(timeout=120)
    assert img.backing_name == v.base
    with pytest.raises(OSError):
        img.flush()
    with pytest.raises(OSError):
        img.close()
    assert img.closed
    rc, out = qemu_check(d["top"])
    assert rc in (0, 3), out
    assert model.explain(raw_of(d["top"], str(tmp_path / "after.raw"))) is None
    cut_power(d["top"], initial, inj.ops(d["top"]), model, name)


def test_failed_flush_undoes_a_copy_on_write(tmp_path, qemu):
    """A guest write to a cluster shared with an internal snapshot copies it and drops
    the shared reference; the flush fails. The copy is unlinked and the drop cancelled
    (the old cluster keeps both references): qemu-img check stays clean and the image
    reads as before (the write counts as not written)."""
    p = qemu.create(tmp_path / "s.qcow2", 1 << 20)
    qemu.io(p, "write -P 1 0 1M")
    qemu.img("snapshot", "-c", "s1", p)
    img = blockpull.open(p)
    inj = faults.attach(img, faults.FaultInjector(record_writes=False))
    img.write(4096, b"\x02" * 65536)           # two shared clusters copied
    inj.fail("sync", "top", errno.EIO)
    with pytest.raises(OSError):
        img.flush()
    with pytest.raises(OSError):
        img.flush()
    with pytest.raises(OSError):
        img.close()
    qemu.assert_clean(p)
    assert qemu.to_raw(p, tmp_path / "s.raw") == b"\x01" * (1 << 20)
    qemu.img("snapshot", "-a", "s1", p)
    assert qemu.to_raw(p, tmp_path / "s1.raw") == b"\x01" * (1 << 20)
