"""Power loss: every state a disk could hold if the power went out during a pull.

A pull (with small chunks and batches, so that there are many sync points) runs with the
recorder attached, while guest writes go through the same Image (some of them flushed).
From the image before and the record of its writes and syncs, the test rebuilds the file
as it could be after a cut at each sync point and between them: everything before the
last completed sync, plus any subset of the writes since, some torn at 512-byte
boundaries. Each state must:

- read the chain's content (both the old and the new backing link read the same data),
  each guest-written sector old or new, and new where the guest's flush had returned;
- have the old backing link or the one asked for, nothing else;
- pass ``qemu-img check`` (leaks allowed, corruption not);
- and, for a sample of states, let a new pull finish the job.

CI: >= 300 states; BLOCKPULL_SOAK=1: >= 1,000 more with fresh seeds.

With a failed sync (``fail_sync``): one of the pull's fdatasyncs fails, the job (under
on_error "stop") pauses and is resumed at once. The model drops the writes that sync
covered for good (Linux may discard those pages); guest flushes that fail, or that
cannot vouch for what the failed sync lost, mark nothing durable.
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
from relhelp import (CORE_NAMES, VARIANTS, Model, assert_no_corruption, backing_of, build_chain,
                     copy_chain, guest_extents, qemu_check, raw_of, seed_list,
                     snapshot_of)

CI_STATES = 330
SOAK_STATES = 1200
EXTL2_STATES = 20     # per extended-L2 variant, on top of CI_STATES

_templates = {}
_snaps = {}           # variant name -> what its internal snapshot s1 reads


def template(tmp_path_factory, name):
    if name not in _templates:
        v = VARIANTS[name]
        root = str(tmp_path_factory.mktemp("pl-" + name))
        chain = build_chain(os.path.join(root, "template"), v)
        before = raw_of(chain["top"], os.path.join(root, "before.raw"))
        _templates[name] = (v, chain, before)
        if v.snapshot:
            _snaps[name] = snapshot_of(chain["top"], os.path.join(root, "s1.raw"))
    return _templates[name]


def _in_job_thread(op, role, offset, length):
    return threading.current_thread().name.startswith("blockpull-pull")


def record_pull(v, chain, before, seed, fail_sync=0):
    """Run a pull with guest writes under the recorder: (initial top bytes, ops, model,
    flush marks). ``fail_sync``: the pull's fdatasync that fails (nth), 0 for none."""
    rng = random.Random(seed)
    top = chain["top"]
    with open(top, "rb") as f:
        initial = f.read()
    model = Model(before)
    wseed = rng.choice([0, seed * 13 + 5])
    ext = guest_extents(random.Random(wseed), v.size, 12) if wseed else []
    datas = [random.Random(wseed * 1000 + i).randbytes(n) for i, (o, n) in enumerate(ext)]
    chunk = max(v.cluster * rng.choice([1, 2, 4]), 8192)
    inj = faults.FaultInjector()

    def flushed(img):
        """Flush; True if it returned (a failed sync may make it raise for good)."""
        try:
            img.flush()
            return True
        except OSError as exc:
            if not fail_sync or exc.errno != errno.EIO:
                raise
            return False

    def resume_at_once(ev):
        if ev.kind == "paused":
            ev.job.resume()

    img = blockpull.open(top, backing_format="qcow2")
    try:
        faults.attach(img, inj)
        if fail_sync:
            inj.fail("sync", "top", errno.EIO, nth=fail_sync, match=_in_job_thread)
        job = img.pull(base=v.base, chunk=chunk, batch=chunk * rng.choice([1, 2, 3]),
                       on_error="stop" if fail_sync else "report",
                       on_event=resume_at_once if fail_sync else None)
        pending = []
        for i, (off, n) in enumerate(ext):
            img.write(off, datas[i])
            model.add(off, datas[i])
            pending.append(i)
            if rng.random() < 0.4 and flushed(img):
                inj.mark(tuple(pending))
                pending = []
            time.sleep(rng.random() * 0.002)
        job.result(timeout=120)
        if flushed(img):
            inj.mark(tuple(pending))
    finally:
        try:
            img.close()
        except OSError:
            if not fail_sync:
                raise
    if fail_sync:
        assert any(o.op == "syncfail" for o in inj.ops(top)), "the sync never failed"
    return initial, inj.ops(top), model


def durable_marks(ops):
    """For each flush mark: the number of syncs of the file before it."""
    out = []
    syncs = 0
    for o in ops:
        if o.op == "sync":
            syncs += 1
        elif o.op == "mark":
            out.append((syncs, o.data))
    return out


def check_state(path, data, model, marks, k, v, what, repull):
    with open(path, "wb") as f:
        f.write(data)
    model.durable = {i for (s, ids) in marks if s <= k for i in ids}
    rc, out = qemu_check(path)
    assert rc in (0, 3), f"{what}: qemu-img check exit {rc}\n{out}"
    # the link is the old one or the one asked for (QEMU's read of the data below
    # shows that the chain it names reads right)
    with blockpull.open(path, readonly=True, backing_format="qcow2") as img:
        link = img.backing_name
    assert link in ("mid.qcow2", v.base), f"{what}: backing link {link!r}"
    got = raw_of(path, path + ".raw")
    problem = model.explain(got)
    assert problem is None, f"{what}: the disk {problem}"
    with blockpull.open(path, readonly=True, backing_format="qcow2") as img:
        assert img.read(0, img.size) == got, f"{what}: blockpull reads differ from qemu-img"
    if v.snapshot:
        assert snapshot_of(path, path + ".s1") == _snaps[v.name], f"{what}: snapshot changed"
    if repull:
        if link != v.base:
            with blockpull.open(path, backing_format="qcow2") as img:
                img.pull(base=v.base).result(timeout=120)
        assert backing_of(path) == v.base, f"{what}: backing after a new pull"
        assert raw_of(path, path + ".raw") == got, f"{what}: a new pull changed the data"
        assert_no_corruption(path, f"{what}: after a new pull")
        if v.snapshot:
            assert snapshot_of(path, path + ".s1") == _snaps[v.name], f"{what}: snapshot changed"


def run_powerloss(tmp_path_factory, tmp_path, name, seed, budget, fail_sync=0):
    v, tchain, before = template(tmp_path_factory, name)
    rng = random.Random(seed)
    chain = copy_chain(tchain, str(tmp_path / f"run{seed}"))
    initial, ops, model = record_pull(v, chain, before, seed, fail_sync)
    rep = faults.Replayer(initial, ops)
    marks = durable_marks(ops)
    assert rep.nsyncs > 3, f"seed {seed}: only {rep.nsyncs} syncs recorded"
    # which sync points: all when the budget allows, else a sample that always has the
    # first ones and the last ones (the final sync and the backing link change)
    ks = list(range(rep.nsyncs + 1))
    busy = [k for k in ks if rep.segment(k)[1] > rep.segment(k)[0]]
    per = max(4, -(-(budget - (len(ks) - len(busy))) // max(1, len(busy))))
    if len(ks) + len(busy) * (per - 1) > budget * 1.5:
        keep = set(ks[:2] + ks[-5:])
        rest = [k for k in ks if k not in keep]
        keep |= set(rng.sample(rest, max(0, min(len(rest), budget // per - len(keep)))))
        ks = sorted(keep)
    state_path = os.path.join(chain["dir"], "state.qcow2" if v.fmt == "qcow2" else "state.qed")
    n = 0
    seen = set()
    for k in ks:
        start, end = rep.segment(k)
        cands = [(bytes(rep.durable(k)), f"sync {k}/{rep.nsyncs}, nothing after")]
        tries = 0
        while end > start and len(cands) < per and tries < per * 3:
            tries += 1
            cands.append(rep.state(k, rng))
        for data, desc in cands:
            h = hash(data)
            if h in seen:
                continue
            seen.add(h)
            what = f"seed {seed} ({v.name}, state {n}: {desc})"
            check_state(state_path, data, model, marks, k, v, what, repull=(n % 12 == 5))
            n += 1
    return n


CI_NAMES = sorted(VARIANTS)


def test_leak_past_end_of_file_is_not_counted_twice(tmp_path, qemu):
    """Found by the power-loss states (a refcount block durable, the data it counts
    not): clusters past the end of the file that a refcount block still counts must not
    be allocated again, or they end with refcount 2 for one reference (corruption)."""
    base = qemu.create(tmp_path / "base.qcow2", 1 << 20)
    qemu.io(base, "write -P 1 0 1M")
    top = qemu.create(tmp_path / "top.qcow2", 1 << 20, backing="base.qcow2")
    with blockpull.open(top) as img:
        drv = img.layers[0]
        end = os.path.getsize(top)
        host = drv.alloc_clusters(3)      # counted, never written nor linked
        assert host >= end
        drv.flush()
    assert os.path.getsize(top) == end    # the counts reached the file, the data did not
    assert qemu.check(top) == 0           # (QEMU looks no further than the end of file)
    with blockpull.open(top, readonly=True) as img:
        assert img.layers[0].refcount(host // 65536) == 1
    with blockpull.open(top) as img:
        img.pull().result(timeout=60)
    rc, out = qemu_check(top)
    assert rc in (0, 3), out
    assert backing_of(top) is None
    assert qemu.compare(top, base)


def run_until(tmp_path_factory, tmp_path, name, first_seed, want):
    """Record pulls with seeds first_seed, first_seed + 1, ... until ``want`` distinct
    states were checked (BLOCKPULL_SEED: exactly the seeds given)."""
    total = 0
    if os.environ.get("BLOCKPULL_SEED"):
        for seed in seed_list([]):
            total += run_powerloss(tmp_path_factory, tmp_path, name, seed, want)
        return total
    s = first_seed
    while total < want:
        total += run_powerloss(tmp_path_factory, tmp_path, name, s, want - total)
        s += 1
        assert s - first_seed < 40, f"{name}: too few distinct states ({total})"
    print(f"{name}: {total} power-loss states, seeds from {first_seed}")
    return total


@pytest.mark.parametrize("name", CI_NAMES)
def test_power_loss_states(tmp_path_factory, tmp_path, name):
    if name in CORE_NAMES:
        want, first = -(-CI_STATES // len(CORE_NAMES)), 7000 + 100 * CORE_NAMES.index(name)
    else:
        want, first = EXTL2_STATES, 8000 + 100 * CI_NAMES.index(name)
    total = run_until(tmp_path_factory, tmp_path, name, first, want)
    assert total >= want or os.environ.get("BLOCKPULL_SEED")


FAIL_NAMES = [n for n in ("v3", "c512", "qed", "extl2") if n in VARIANTS]


@pytest.mark.parametrize("name", FAIL_NAMES)
def test_power_loss_states_after_failed_sync(tmp_path_factory, tmp_path, name):
    """A pull whose fdatasync fails part-way, resumed at once, with guest writes: every
    state a power cut could leave, the writes the failed sync covered lost for good."""
    total, seed = 0, 9100 + 100 * FAIL_NAMES.index(name)
    while total < 40:
        total += run_powerloss(tmp_path_factory, tmp_path, name, seed, 40 - total,
                               fail_sync=2 + seed % 4)
        seed += 1
        assert seed < 9100 + 100 * FAIL_NAMES.index(name) + 20, f"{name}: too few states"


@pytest.mark.slow
@pytest.mark.parametrize("name", CI_NAMES)
def test_power_loss_states_soak(tmp_path_factory, tmp_path, name):
    want = -(-SOAK_STATES // len(CORE_NAMES))
    first = int(time.time()) % 100_000 * 100
    total = run_until(tmp_path_factory, tmp_path, name, first, want)
    assert total >= want or os.environ.get("BLOCKPULL_SEED")
