"""I/O errors during a pull, at every kind of write the pull makes, under each policy.

A calibration run records the pull's top writes and syncs; each write is classified by
where it lands in the image (data cluster, L2 table, L1 table, refcount block, refcount
table entry, a new refcount table after growth (512-byte clusters force it), the header
switch to it, the backing link change). Then, for each kind, a fresh copy is pulled with
that exact write failing (EIO or ENOSPC), or a sync failing, or a backing read failing,
under on_error "report" (the job fails), "stop" (it pauses; resume finishes it) and
"ignore" (it carries on and finishes as failed). In every case: the backing link is kept
on a failed job, nothing is lost (the image reads as before), qemu-img check finds at
most leaks, events arrive once each, and a new pull (or the resumed one) finishes.
"""
from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
import threading
import time

import pytest

import blockpull
from blockpull import faults
from relhelp import (REPAIR_VARIANTS, VARIANTS, assert_no_corruption, backing_of, build_chain, copy_chain,
                     raw_of, snapshot_of)

CHUNK = 65536
BATCH = 4 * 65536


def qcow2_layout(path):
    """(cluster size, L1 range, reftable range, set of L2 offsets, set of refblock offsets)."""
    with open(path, "rb") as f:
        data = f.read()
    cbits, = struct.unpack(">I", data[20:24])
    cs = 1 << cbits
    l1_size, l1_off, rt_off, rt_cl = struct.unpack(">IQQI", data[36:60])
    l2s = set()
    for i in range(l1_size):
        e, = struct.unpack(">Q", data[l1_off + 8 * i:l1_off + 8 * i + 8])
        if e & 0x00FFFFFFFFFFFE00:
            l2s.add(e & 0x00FFFFFFFFFFFE00)
    rbs = set()
    for i in range(rt_cl * cs // 8):
        e, = struct.unpack(">Q", data[rt_off + 8 * i:rt_off + 8 * i + 8])
        if e & ~0x1FF:
            rbs.add(e & ~0x1FF)
    return cs, (l1_off, l1_off + l1_size * 8), (rt_off, rt_off + rt_cl * cs), l2s, rbs


class Classifier:
    """The kind of each top write, from where it lands in the image (the layout of the
    calibration run: the same pull allocates the same places)."""

    def __init__(self, initial_path, final_path):
        self.cs, self.l1, self.rt_final, self.l2s, self.rbs = qcow2_layout(final_path)
        _, _, self.rt_first, _, _ = qcow2_layout(initial_path)
        self.switched = False

    def kind(self, off, n):
        cs = self.cs
        inside = lambda r: r[0] <= off < r[1]   # noqa: E731
        if off < cs:
            if off == 48 and n == 12:
                self.switched = True
                return "header"          # the switch to a grown refcount table
            return "link"
        if (inside(self.rt_first) and not self.switched) or inside(self.rt_final):
            return "reftable-new" if n >= cs and not inside(self.rt_first) else "reftable-entry"
        if off - off % cs in self.rbs:
            return "refblock"
        if off - off % cs in self.l2s:
            return "l2"
        if inside(self.l1):
            return "l1"
        return "data"


def classify(initial_path, final_path, ops):
    """kind of each top write, in order (index i = the (i+1)-th write)."""
    c = Classifier(initial_path, final_path)
    return [c.kind(o.offset, len(o.data)) for o in ops if o.op == "write"]


class Sites:
    """The fault sites of one variant: kind -> nth top write; sync sites; chain."""

    def __init__(self, root, v):
        self.v = v
        self.chain = build_chain(os.path.join(root, "template"), v)
        self.before_raw = os.path.join(root, "before.raw")
        with open(self.before_raw, "wb") as f:
            f.write(raw_of(self.chain["top"], os.path.join(root, "x.raw")))
        d = copy_chain(self.chain, os.path.join(root, "calib"))
        inj = faults.FaultInjector()
        with blockpull.open(d["top"]) as img:
            faults.attach(img, inj)
            img.pull(base=v.base, chunk=CHUNK, batch=BATCH).result(timeout=120)
        ops = [o for o in inj.ops(d["top"]) if o.op in ("write", "sync")]
        kinds = classify(self.chain["top"], d["top"], ops)
        self.kinds = kinds
        self.layout = (self.chain["top"], d["top"])
        self.writes = {}
        for k in sorted(set(kinds)):
            n = kinds.count(k)
            self.writes[k] = n // 2 + 1              # a write of that kind mid-way
        # syncs: the first, one mid-way, and the last one before the link change
        sync_nth, nw, first_link = [], 0, None
        for o in ops:
            if o.op == "write":
                nw += 1
                if kinds[nw - 1] == "link" and first_link is None:
                    first_link = len(sync_nth)
            else:
                sync_nth.append(len(sync_nth) + 1)
        self.syncs = {"sync-first": 1, "sync-mid": max(1, len(sync_nth) // 2)}
        if first_link:
            self.syncs["sync-final"] = first_link


_sites = {}


def write_rule(s, kind, err):
    """A rule failing the top write of ``kind`` mid-way (the n-th write of that kind in the
    calibration run): counted by kind, as the pull's flush points may fall between
    different chunks from run to run (reads in flight), which moves the absolute index of
    a table write but not what it is."""
    c = Classifier(*s.layout)
    return dict(op="write", role="top", errno=err, nth=s.writes[kind],
                match=lambda op, role, off, n: c.kind(off, n) == kind)


def sites(tmp_path_factory, name):
    if name not in _sites:
        _sites[name] = Sites(str(tmp_path_factory.mktemp("faults-" + name)),
                             {**VARIANTS, **REPAIR_VARIANTS}[name])
    return _sites[name]


def test_calibration_found_every_kind(tmp_path_factory):
    """The whole-chain pull into 512-byte clusters makes every kind of write there is
    (else the matrix below would silently test less than it says)."""
    s = sites(tmp_path_factory, "c512")
    assert set(s.writes) >= {"data", "l2", "l1", "refblock", "reftable-entry",
                              "reftable-new", "header", "link"}, s.writes
    p = sites(tmp_path_factory, "v3-partial")
    assert {"data", "l2", "refblock", "link"} <= set(p.writes), p.writes
    assert "sync-final" in s.syncs and "sync-final" in p.syncs


def run_case(tmp_path, s, policy, rule_kw):
    """Pull a fresh copy with one failing operation; check everything the interface says."""
    v = s.v
    d = copy_chain(s.chain, str(tmp_path / "img"))
    top = d["top"]
    snap = snapshot_of(top, os.path.join(d["dir"], "s1.raw")) if v.snapshot else None
    events = []
    lock = threading.Lock()

    def on_event(ev):
        with lock:
            events.append(ev)

    inj = faults.FaultInjector(record_writes=False)
    img = blockpull.open(top)
    try:
        faults.attach(img, inj)
        rule = inj.fail(**rule_kw)
        job = img.pull(base=v.base, on_error=policy, on_event=on_event, chunk=CHUNK,
                       batch=BATCH)
        if policy == "stop":
            t0 = time.monotonic()
            while job.status != "paused" and not job.done():
                assert time.monotonic() - t0 < 60, "job never paused"
                time.sleep(0.005)
            assert rule.fired == 1, f"the fault never fired: {rule}"
            assert job.status == "paused" and not job.done()
            kinds = [e.kind for e in events]
            assert kinds == ["error", "paused"], kinds
            err = events[0].error
            assert err.errno == rule_kw["errno"]
            # still backed while paused
            assert img.backing_name == "mid.qcow2"
            job.resume()
            info = job.result(timeout=120)
            assert info.cur == info.end
            kinds = [e.kind for e in events]
            assert kinds == ["error", "paused", "resumed", "completed"], kinds
            assert img.backing_name == v.base
        else:
            with pytest.raises(blockpull.PullError) as ei:
                job.result(timeout=120)
            assert rule.fired == 1, f"the fault never fired: {rule}"
            err = ei.value
            assert err.errno == rule_kw["errno"], (err, err.errno)
            want_op = "read" if rule_kw.get("op") == "read" else "write"
            assert err.operation == want_op, err.operation
            kinds = [e.kind for e in events]
            assert kinds == (["failed"] if policy == "report" else ["error", "failed"]), kinds
            assert events[-1].error is not None and events[-1].error.errno == rule_kw["errno"]
            assert job.status == "failed"
            # the link is kept and nothing is lost, seen from this very Image
            assert img.backing_name == "mid.qcow2"
            with open(s.before_raw, "rb") as f:
                assert img.read(0, img.size) == f.read()
    finally:
        faults.detach(img)
        img.close()
    # from outside: QEMU's view
    assert backing_of(top) == ("mid.qcow2" if policy != "stop" else v.base)
    assert_no_corruption(top, f"{policy} {rule_kw}: after the job")
    assert subprocess.run(["qemu-img", "compare", "-q", top, s.before_raw]).returncode == 0
    if snap is not None:
        assert snapshot_of(top, os.path.join(d["dir"], "s1.raw")) == snap, "snapshot changed"
    if policy != "stop":
        with blockpull.open(top) as img:
            img.pull(base=v.base).result(timeout=120)
        assert backing_of(top) == v.base
        assert_no_corruption(top, f"{policy} {rule_kw}: after a new pull")
        assert subprocess.run(["qemu-img", "compare", "-q", top, s.before_raw]).returncode == 0
        if snap is not None:
            assert snapshot_of(top, os.path.join(d["dir"], "s1.raw")) == snap, "snapshot changed"
    shutil.rmtree(d["dir"])


def in_job_thread(op, role, offset, length):
    return threading.current_thread().name.startswith("blockpull-pull")


POLICIES = ["report", "stop", "ignore"]
WRITE_KINDS = ["data", "l2", "l1", "refblock", "reftable-entry", "reftable-new", "header", "link"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("kind", WRITE_KINDS)
def test_write_fault(tmp_path_factory, tmp_path, kind, err, policy):
    s = sites(tmp_path_factory, "c512")
    run_case(tmp_path, s, policy, write_rule(s, kind, err))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
@pytest.mark.parametrize("kind", ["data", "l2", "link"])
def test_write_fault_partial_pull(tmp_path_factory, tmp_path, kind, err, policy):
    """A pull that keeps a base: its link change writes a new name, then the header."""
    s = sites(tmp_path_factory, "v3-partial")
    run_case(tmp_path, s, policy, write_rule(s, kind, err))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["data", "l2", "refblock", "link"])
def test_write_fault_repaired_on_open(tmp_path_factory, tmp_path, kind, policy):
    """A lazy-refcount top its writer left dirty: the open repairs it, then the pull
    meets an I/O error."""
    s = sites(tmp_path_factory, "v3-lazy")
    run_case(tmp_path, s, policy, write_rule(s, kind, errno.EIO))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("where", ["sync-first", "sync-mid", "sync-final"])
@pytest.mark.parametrize("name", ["c512", "v3-partial"])
def test_sync_fault(tmp_path_factory, tmp_path, name, where, policy):
    s = sites(tmp_path_factory, name)
    run_case(tmp_path, s, policy, dict(op="sync", role="top", errno=errno.EIO,
                                       nth=s.syncs[where]))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("where", ["data", "l2", "link", "sync-mid"])
@pytest.mark.parametrize("name", ["extl2-partial", "extl2-snap"])
def test_fault_extended_l2(tmp_path_factory, tmp_path, name, where, policy):
    """The same faults in a pull into a top with extended L2 entries (subclusters),
    partly allocated clusters and zero subclusters among them, keeping a base; and into
    one with an internal snapshot sharing those clusters."""
    s = sites(tmp_path_factory, name)
    if where.startswith("sync"):
        rule = dict(op="sync", role="top", errno=errno.EIO, nth=s.syncs[where])
    else:
        rule = write_rule(s, where, errno.EIO)
    run_case(tmp_path, s, policy, rule)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["c512", "v3-partial"])
def test_backing_read_fault(tmp_path_factory, tmp_path, name, policy):
    s = sites(tmp_path_factory, name)
    # the 3rd backing read of the copy loop (the job's thread), not of the planning
    run_case(tmp_path, s, policy, dict(op="read", role="backing", errno=errno.EIO, nth=3,
                                       match=in_job_thread))


def test_planning_read_fault_raises_at_start(tmp_path_factory, tmp_path):
    """A backing read failing while the pull is planned: Image.pull raises the OSError,
    no job runs, the image is untouched and a later pull works."""
    s = sites(tmp_path_factory, "v3-partial")
    d = copy_chain(s.chain, str(tmp_path / "img"))
    with blockpull.open(d["top"]) as img:
        inj = faults.attach(img, faults.FaultInjector())
        inj.fail("read", "backing", errno.EIO, times=None)
        with pytest.raises(OSError) as ei:
            img.pull(base=s.v.base)
        assert ei.value.errno == errno.EIO
        faults.detach(img)
        img.pull(base=s.v.base).result(timeout=60)
    assert subprocess.run(["qemu-img", "compare", "-q", d["top"], s.before_raw]).returncode == 0


def test_persistent_enospc_under_stop_then_space_returns(tmp_path_factory, tmp_path):
    """Every top write fails (a full disk) under "stop": the job pauses on the first
    error and stays paused; once space is back, resume finishes it."""
    s = sites(tmp_path_factory, "c512")
    d = copy_chain(s.chain, str(tmp_path / "img"))
    events = []
    with blockpull.open(d["top"]) as img:
        inj = faults.attach(img, faults.FaultInjector(record_writes=False))
        rule = inj.fail("write", "top", errno.ENOSPC, nth=20, times=None)
        job = img.pull(on_error="stop", on_event=lambda e: events.append(e.kind),
                       chunk=CHUNK, batch=BATCH)
        t0 = time.monotonic()
        while job.status != "paused":
            assert time.monotonic() - t0 < 60 and not job.done()
            time.sleep(0.005)
        job.resume()                       # still full: it fails again and pauses again
        t0 = time.monotonic()
        while events.count("paused") < 2:
            assert time.monotonic() - t0 < 60 and not job.done()
            time.sleep(0.005)
        assert rule.fired >= 2
        inj.clear()
        job.resume()
        job.result(timeout=120)
        faults.detach(img)
    assert events == ["error", "paused", "resumed", "error", "paused", "resumed", "completed"]
    assert backing_of(d["top"]) is None
    assert_no_corruption(d["top"], "after a full disk")
    assert subprocess.run(["qemu-img", "compare", "-q", d["top"], s.before_raw]).returncode == 0


def test_persistent_eio_under_report_keeps_image(tmp_path_factory, tmp_path):
    """A device failing every write from some point: the job fails, the image closes
    with an error (it cannot flush), and once the device is healthy it reads as before
    and a pull finishes."""
    s = sites(tmp_path_factory, "c512")
    d = copy_chain(s.chain, str(tmp_path / "img"))
    img = blockpull.open(d["top"])
    inj = faults.attach(img, faults.FaultInjector(record_writes=False))
    inj.fail("write", "top", errno.EIO, nth=30, times=None)
    job = img.pull(chunk=CHUNK, batch=BATCH)
    with pytest.raises(blockpull.PullError):
        job.result(timeout=120)
    with pytest.raises(OSError):
        img.close()
    assert img.closed
    assert backing_of(d["top"]) == "mid.qcow2"
    assert_no_corruption(d["top"], "after a dead device")
    assert subprocess.run(["qemu-img", "compare", "-q", d["top"], s.before_raw]).returncode == 0
    with blockpull.open(d["top"]) as img:
        img.pull().result(timeout=60)
    assert subprocess.run(["qemu-img", "compare", "-q", d["top"], s.before_raw]).returncode == 0
    assert_no_corruption(d["top"], "after the pull that followed")


ENOSPC_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "enospc_child.py")


@pytest.mark.parametrize("policy", POLICIES)
def test_real_enospc_on_small_tmpfs(tmp_path_factory, tmp_path, policy):
    """A real full file system, not an injected one: a tmpfs with room for part of the
    pull, mounted in a private mount namespace (as root: ``unshare --mount``; otherwise
    a user namespace maps us to root for it)."""
    s = sites(tmp_path_factory, "v3")
    prefix = ["unshare", "--mount"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]
    from relhelp import PY, child_env
    r = subprocess.run(prefix + [PY, ENOSPC_CHILD, s.chain["dir"], str(tmp_path), policy],
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_failed_sync_after_refcount_table_switch(tmp_path, qemu):
    """The header is switched to a grown refcount table, then the sync after it fails.
    The header may already point at the new table, so a second growth must not give the
    new table's clusters back (a crash would leave the header pointing at freed, maybe
    reused, clusters). Tiny clusters make the table grow every few MiB."""
    path = qemu.create(tmp_path / "g.qcow2", 64 << 20, opts=["cluster_size=512"])
    model = bytearray(64 << 20)
    state = {"armed": False}

    def after_header_write(op, role, off, n):
        if op == "write" and off == 48 and n == 12:
            state["armed"] = True
            return False
        if op == "sync" and state["armed"]:
            state["armed"] = False
            return True
        return False

    def header_table(img):
        f = img.layers[0].file
        return struct.unpack(">QI", f.pread(48, 12))

    with blockpull.open(path) as img:
        inj = faults.attach(img, faults.FaultInjector(record_writes=False))
        rule = inj.fail(None, "top", match=after_header_write)
        top = img.layers[0]
        off, failed = 0, False
        while off < (48 << 20):
            data = bytes([(off >> 20) + 1]) * (1 << 20)
            img.write(off, data)
            model[off:off + len(data)] = data
            off += len(data)
            if not failed:   # after the failure: on, with no flush, through another growth
                try:
                    img.flush()
                except OSError:
                    failed = True
            rt_off, rt_cl = header_table(img)
            for c in range(rt_cl):   # what the header names is never free
                assert top.refcount((rt_off >> 9) + c) == 1, (off, rt_off, c)
        assert failed and rule.fired == 1
        inj.clear()
        img.flush()
    assert qemu.check(path) == 0
    assert qemu.to_raw(path, tmp_path / "g.raw") == bytes(model)
