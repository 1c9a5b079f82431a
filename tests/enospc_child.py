"""A real full disk: pulls into a size-limited tmpfs, run by test_faults.py inside a
private mount namespace (``unshare --mount``, or ``--user --map-root-user --mount``).

    python enospc_child.py TEMPLATE_DIR WORK_DIR POLICY

Copies the chain of TEMPLATE_DIR into a tmpfs with room for only part of the pull, pulls
under POLICY, and checks what the interface promises; then makes room (remount with a
larger size) and finishes (a new pull, or resume under "stop"). Exit 0 when all holds;
prints what failed otherwise.
"""
import errno
import os
import shutil
import subprocess
import sys
import time

import blockpull

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from relhelp import assert_no_corruption, backing_of, raw_of  # noqa: E402


def mount(mnt: str, size: int, remount: bool = False) -> None:
    opts = f"size={size}" if not remount else f"remount,size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", mnt], check=True)


def used(mnt: str) -> int:
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def main() -> None:
    template, work, policy = sys.argv[1:4]
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    mount(mnt, 64 << 20)
    for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        shutil.copyfile(os.path.join(template, name), os.path.join(mnt, name))
    top = os.path.join(mnt, "top.qcow2")
    before = raw_of(top, os.path.join(work, "before.raw"))
    # room for about a third of what the pull writes
    limit = used(mnt) + (1 << 20)
    mount(mnt, limit, remount=True)
    events = []
    with blockpull.open(top) as img:
        job = img.pull(on_error=policy, on_event=lambda e: events.append(e),
                       chunk=65536, batch=262144)
        if policy == "stop":
            t0 = time.monotonic()
            while job.status != "paused":
                assert not job.done(), f"job ended instead of pausing: {job.error!r}"
                assert time.monotonic() - t0 < 60, "job never paused"
                time.sleep(0.01)
            assert [e.kind for e in events] == ["error", "paused"], [e.kind for e in events]
            assert events[0].error.errno == errno.ENOSPC, events[0].error
            assert img.backing_name == "mid.qcow2"
            mount(mnt, 64 << 20, remount=True)    # room again
            job.resume()
            job.result(timeout=120)
            kinds = [e.kind for e in events]
            assert kinds == ["error", "paused", "resumed", "completed"], kinds
        else:
            try:
                job.result(timeout=120)
                raise AssertionError("the pull did not fail on a full disk")
            except blockpull.PullError as exc:
                assert exc.errno == errno.ENOSPC, (exc, exc.errno)
                assert exc.operation == "write", exc.operation
            kinds = [e.kind for e in events]
            assert kinds.count("failed") == 1 and kinds[-1] == "failed", kinds
            assert kinds.count("error") == (0 if policy == "report" else kinds.count("error"))
            if policy == "ignore":
                assert kinds.count("error") >= 1, kinds
            assert img.backing_name == "mid.qcow2"
            assert img.read(0, img.size) == before, "data lost on a full disk"
            mount(mnt, 64 << 20, remount=True)    # room again before close flushes
    if policy != "stop":
        assert backing_of(top) == "mid.qcow2"
        assert_no_corruption(top, f"{policy}: after ENOSPC")
        assert raw_of(top, os.path.join(work, "mid.raw")) == before
        with blockpull.open(top) as img:
            img.pull().result(timeout=120)
    assert backing_of(top) is None
    assert_no_corruption(top, f"{policy}: after the pull that finished")
    assert raw_of(top, os.path.join(work, "after.raw")) == before
    subprocess.run(["umount", mnt], check=True)
    print("ok")


if __name__ == "__main__":
    main()
