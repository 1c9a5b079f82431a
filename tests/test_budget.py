"""A bandwidth shared by several consumers (blockpull.budget.Budget on RateLimiter).

Behaviour, not timing: the schedule never lets the consumers together get ahead of the
budget (an upper bound that a slow machine cannot break), slots go round so consumers that
draw equally get equal counts, a job's own limit holds inside the budget, and a wake reaches
a consumer sleeping on the budget's schedule.
"""
from __future__ import annotations

import threading
import time

import pytest

from blockpull._ratelimit import RateLimiter
from blockpull.budget import Budget

MiB = 1 << 20


def _drain(limiter, chunk, stop, counts, key):
    while not stop.is_set():
        if not limiter.consume(chunk):
            counts[key] += chunk


def _run(limiters, chunk, seconds):
    counts = {i: 0 for i in range(len(limiters))}
    stop = threading.Event()
    threads = [threading.Thread(target=_drain, args=(lim, chunk, stop, counts, i))
               for i, lim in enumerate(limiters)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for lim in limiters:
        lim.wake()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    return counts, time.monotonic() - t0


def test_consumers_of_one_budget_share_its_rate_fairly():
    budget = Budget(40 * MiB)
    jobs = [budget.job_limiter() for _ in range(3)]
    counts, elapsed = _run(jobs, MiB, 1.5)
    total = sum(counts.values())
    # the schedule is absolute: everyone together never gets ahead of the budget
    # (one chunk each may be granted at the start of the epoch)
    assert total <= 40 * MiB * elapsed + 3 * MiB
    assert total >= 10 * MiB  # they did run
    lo, hi = min(counts.values()), max(counts.values())
    assert hi - lo <= max(MiB, 0.10 * hi), counts


def test_a_jobs_own_speed_holds_inside_the_budget():
    budget = Budget(64 * MiB)
    slow = budget.job_limiter(4 * MiB)
    fast = budget.job_limiter()
    counts, elapsed = _run([slow, fast], 256 * 1024, 1.5)
    assert counts[0] <= 4 * MiB * elapsed + 256 * 1024
    assert counts[1] > 2 * counts[0]  # the fast one takes what the slow one leaves
    assert counts[0] + counts[1] <= 64 * MiB * elapsed + 2 * 256 * 1024


def test_wake_reaches_a_consumer_sleeping_on_the_budget():
    budget = Budget(1 * MiB)
    job = budget.job_limiter()
    assert not job.consume(1024)  # start the epoch
    result = {}

    def draw():
        result["woken"] = job.consume(100 * MiB)  # ~100 s on the budget's schedule

    t = threading.Thread(target=draw)
    t.start()
    time.sleep(0.2)
    job.wake()
    t.join(5)
    assert not t.is_alive()
    assert result["woken"] is True
    # the woken draw gave its slot back: a small draw now is not pushed 100 s out
    other = budget.job_limiter()
    t0 = time.monotonic()
    assert not other.consume(1024)
    assert time.monotonic() - t0 < 5


def test_set_speed_applies_to_every_job_and_unlimited_means_no_wait():
    budget = Budget("1M")
    assert budget.bandwidth == MiB
    job = budget.job_limiter()
    budget.set_speed(0)
    t0 = time.monotonic()
    for _ in range(100):
        assert not job.consume(64 * MiB)
    assert time.monotonic() - t0 < 5
    assert repr(budget) == "Budget(unlimited)"
    with pytest.raises(ValueError):
        budget.set_speed(-1)
    with pytest.raises(ValueError):
        Budget("fast")


def test_a_single_limiter_keeps_its_rate_with_two_threads():
    # the reservation makes two threads on one limiter share it (before, each could take
    # the same slot)
    lim = RateLimiter(20 * MiB)
    counts, elapsed = _run([lim, lim], MiB, 1.0)
    assert sum(counts.values()) <= 20 * MiB * elapsed + 2 * MiB


#: the idle time (s) a limiter's schedule may keep as credit (_ratelimit.MAX_LAG)
MAX_LAG = 0.1


def _draw_for(limiter, chunk, seconds):
    """Draw ``chunk`` after ``chunk`` for about ``seconds``: (bytes granted, elapsed)."""
    got = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if not limiter.consume(chunk):
            got += chunk
    return got, time.monotonic() - t0


@pytest.mark.parametrize("shared", [True, False], ids=["budget", "own-limiter"])
def test_idle_time_is_not_saved_up_for_a_burst(shared):
    # a budget made before its pulls start (serve(budget=), a program's start) or one
    # every job paused on must not grant the idle seconds as a burst afterwards
    rate = 8 * MiB
    limiter = Budget(rate).job_limiter() if shared else RateLimiter(rate)
    time.sleep(1.0)
    got, elapsed = _draw_for(limiter, 256 * 1024, 0.5)
    assert got <= rate * (elapsed + MAX_LAG) + 256 * 1024, got / MiB


def test_a_jobs_own_speed_holds_after_the_budget_held_it_back():
    # three jobs share 12 MiB/s (4 each): the one with its own 8 MiB/s falls behind its
    # own schedule, which must not become credit above 8 MiB/s once it is alone
    budget = Budget(12 * MiB)
    own = budget.job_limiter(8 * MiB)
    _run([own, budget.job_limiter(), budget.job_limiter()], 256 * 1024, 1.5)
    got, elapsed = _draw_for(own, 256 * 1024, 1.0)
    assert got <= 8 * MiB * (elapsed + MAX_LAG) + 256 * 1024, got / MiB


# ---- real pulls sharing a budget ----------------------------------------------------------

def _chain(qemu, tmp_path, name, size, writes=None):
    """base (``writes``, qemu-io commands; default: 0x5a all over) <- empty top: the
    top and a raw file of what it reads."""
    base = tmp_path / f"{name}-base.qcow2"
    top = tmp_path / f"{name}.qcow2"
    qemu.img("create", "-q", "-f", "qcow2", str(base), str(size))
    qemu.io(str(base), *(writes or [f"write -P 0x5a 0 {size}"]), fmt="qcow2")
    qemu.img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    ref = tmp_path / f"{name}.raw"
    qemu.img("convert", "-O", "raw", str(top), str(ref))
    return top, ref


def test_pulls_sharing_a_budget_complete_correctly_and_within_it(qemu, tmp_path):
    import blockpull
    size = 8 * MiB
    chains = [_chain(qemu, tmp_path, f"t{i}", size) for i in range(3)]
    budget = blockpull.Budget("24M")
    imgs = [blockpull.open(str(top)) for top, _ in chains]
    try:
        t0 = time.monotonic()
        jobs = [img.pull(budget=budget, chunk=MiB) for img in imgs]
        assert all(j.budget is budget for j in jobs)
        infos = [j.result() for j in jobs]
        elapsed = time.monotonic() - t0
    finally:
        for img in imgs:
            img.close()
    # 24 MiB through a 24 MiB/s budget: the schedule cannot finish in much under a second
    # (one chunk per job may start at once)
    assert elapsed >= (3 * size - 3 * MiB) / (24 * MiB) * 0.99
    for (top, ref), info in zip(chains, infos):
        assert info.cur == info.end == size
        qemu.img("check", str(top))
        qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))
        assert "backing-filename" not in qemu.info(str(top))


def test_one_shot_and_libvirt_facade_take_a_budget(qemu, tmp_path):
    import blockpull
    top, ref = _chain(qemu, tmp_path, "one", 2 * MiB)
    info = blockpull.pull(str(top), budget=blockpull.Budget(0))
    assert info.cur == info.end
    qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))
    top2, ref2 = _chain(qemu, tmp_path, "two", 2 * MiB)
    assert blockpull.block_pull(str(top2), 0, budget=blockpull.Budget("100M")) == 0
    deadline = time.monotonic() + 30
    while True:
        i = blockpull.get_block_pull_info(str(top2))
        if i.end and i.cur == i.end:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    blockpull.block_pull_abort(str(top2))  # waits until closed (no-op on a finished job)
    qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top2), str(ref2))


def test_served_images_pull_within_one_budget(qemu, tmp_path):
    import blockpull
    budget = blockpull.Budget("50M")
    chains = [_chain(qemu, tmp_path, f"s{i}", 4 * MiB) for i in range(2)]
    servers = [blockpull.serve(str(top), pull=True, budget=budget) for top, _ in chains]
    try:
        for srv in servers:
            assert srv.job.budget is budget
            srv.job.result()
    finally:
        for srv in servers:
            srv.close()
    for top, ref in chains:
        qemu.img("check", str(top))
        qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))


def test_a_pull_under_a_budget_copies_in_small_steps(qemu, tmp_path):
    # the step follows the budget's rate as it follows a job's own (about 1/64 s of it):
    # one 8 MiB step under a 4 MiB/s budget is a 2 s stall, then a burst, and the jobs
    # sharing the budget take turns of seconds
    import blockpull
    rate = 4 * MiB
    top, ref = _chain(qemu, tmp_path, "steps", 4 * MiB)
    img = blockpull.open(str(top))
    try:
        job = img.pull(budget=blockpull.Budget(rate))
        samples = []  # (time before reading, bytes copied, time after reading)
        while not job.done():
            t_before = time.monotonic()
            cur = job.info().cur
            samples.append((t_before, cur, time.monotonic()))
            time.sleep(0.02)
        job.result()
    finally:
        img.close()
    # no short window copies more than the budget allows plus a few small steps
    slack = rate * MAX_LAG + 1 * MiB
    for i, (t_i, cur_i, _a) in enumerate(samples):
        for _b, cur_j, t_j in samples[i + 1:]:
            assert cur_j - cur_i <= rate * (t_j - t_i) + slack, (cur_j - cur_i, t_j - t_i)
    qemu.img("check", str(top))
    qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))


def test_a_rate_below_one_byte_per_second_is_refused_not_unlimited(qemu, tmp_path):
    # "0.5" (bytes/s) used to round to 0, which means unlimited
    import blockpull
    for bad in ("0.5", 0.5, "0.9/s"):
        with pytest.raises(ValueError, match="below 1 byte/s"):
            Budget(bad)
    budget = Budget("1M")
    with pytest.raises(ValueError, match="below 1 byte/s"):
        budget.set_speed("0.1")
    assert budget.bandwidth == MiB
    top, ref = _chain(qemu, tmp_path, "frac", MiB)
    with pytest.raises(ValueError, match="below 1 byte/s"):
        blockpull.pull(str(top), bandwidth="0.5")
    with pytest.raises(ValueError, match="whole number"):
        blockpull.block_pull(str(top), 0.5)  # libvirt's MiB/s
    assert qemu.info(str(top))["backing-filename"] == f"{top.stem}-base.qcow2"
    qemu.img("check", str(top))


def test_a_budget_that_is_not_a_budget_is_refused_at_once(qemu, tmp_path):
    # budget="10M" failed deep inside with AttributeError, and serve() stored it for a
    # later (QMP) pull to fail on
    import blockpull
    top, _ref = _chain(qemu, tmp_path, "typo", MiB)
    with pytest.raises(TypeError, match="blockpull.Budget"):
        blockpull.pull(str(top), budget="10M")
    with blockpull.open(str(top)) as img:
        with pytest.raises(TypeError, match="bandwidth="):
            img.pull(budget=10 * MiB)
        assert img.job is None
    with pytest.raises(blockpull.ServeError, match="blockpull.Budget"):
        blockpull.serve(str(top), budget="10M")
    with pytest.raises(TypeError):
        blockpull.block_pull(str(top), 1, budget="10M")
    qemu.img("check", str(top))
    assert qemu.info(str(top))["backing-filename"] == f"{top.stem}-base.qcow2"


# ---- what a pull is charged for ---------------------------------------------------------

def test_a_limiter_counts_what_was_drawn_and_given_back():
    # ``charged``: draws granted minus refunds, here and on the parent; a woken draw
    # costs nothing; a refund moves the schedule back only within the draw's epoch
    budget = Budget(0)
    lim = budget.job_limiter()
    assert not lim.consume(3 * MiB)
    epochs = lim.draw_epochs()
    assert not lim.consume(2 * MiB)
    lim.give_back(MiB, *epochs)
    assert (lim.charged, budget.limiter.charged) == (4 * MiB, 4 * MiB)
    slow = RateLimiter(MiB)
    assert not slow.consume(64 * 1024)          # the schedule starts
    mine, parents = slow.draw_epochs()
    assert parents == -1
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("woken", slow.consume(100 * MiB)))
    t.start()
    while t.is_alive():
        slow.wake()
        t.join(0.05)
    assert result["woken"] and slow.charged == 64 * 1024
    with pytest.raises(ValueError):
        slow.give_back(0, mine, parents)


def _dense_chain(qemu, tmp_path, name, size):
    half = size // 2
    return _chain(qemu, tmp_path, name, size,
                  [f"write -P 0x5a 0 {half}", f"write -P 0xa5 {half} {half}"])


def test_a_limited_pull_is_charged_for_what_it_copies(qemu, tmp_path):
    # the pull plans the whole disk, then pauses; copy-on-read fills the second half.
    # Before, every chunk drew its whole range from the limiter before looking at what
    # the top lacked: the second half cost as much as copying it, and the pull ended late
    import blockpull
    size = 16 * MiB
    top, ref = _dense_chain(qemu, tmp_path, "cor", size)
    budget = blockpull.Budget("1M")       # 64 KiB steps; the first half takes 8 s
    with blockpull.open(str(top), copy_on_read=True) as img:
        job = img.pull(budget=budget)
        while job.info().cur == 0 and not job.done():
            time.sleep(0.005)
        job.pause()
        assert job.status == "paused"
        img.read(size // 2, size // 2)    # copy-on-read: the second half is the top's now
        budget.set_speed(0)
        job.resume()
        info = job.result(timeout=60)
        assert info.cur == info.end
    assert info.copied_bytes == size // 2
    assert budget.limiter.charged == info.copied_bytes
    qemu.img("check", str(top))
    qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))
    assert "backing-filename" not in qemu.info(str(top))


@pytest.mark.parametrize("own,size", [(True, 8 * MiB), (False, 8 * MiB),
                                      (True, 8 * MiB - 1536)],
                         ids=["own-limit", "budget", "short-last-cluster"])
def test_a_whole_limited_pull_is_charged_exactly_what_it_copies(qemu, tmp_path, own, size):
    import blockpull
    top, ref = _dense_chain(qemu, tmp_path, "whole", size)
    budget = blockpull.Budget(0 if own else "256M")
    with blockpull.open(str(top)) as img:
        info = img.pull(budget=budget, bandwidth="256M" if own else 0).result(timeout=60)
    assert info.copied_bytes == size
    assert budget.limiter.charged == size
    qemu.img("compare", "-f", "qcow2", "-F", "raw", str(top), str(ref))
