"""A keep-compressed pull (``compressed="keep"``) into an overlay on a tmpfs with room
for only part of it, run by test_found_enospc_keep.py inside a private mount namespace.

    python enospc_keep_child.py WORK_DIR DEPTH CHUNK [stop]

The template (24 MiB of text, zlib-compressed clusters) lives outside the tmpfs, the
overlay inside it. The pull must fail on ENOSPC and keep what reached the file: the
compressed clusters written before the error stay linked (as for inflated clusters, a
full disk lets part of a write through), nothing leaks, the image reads as before and
stays backed; with room again a new keep-compressed pull completes (under "stop": the
pull pauses instead, and once there is room ``resume()`` completes it). Exit 0 and "ok"
when all holds.
"""
import errno
import os
import random
import sys
import time

import blockpull
from childhelp import judge as _judge, sh, top_map

MiB = 1 << 20


def judge(top, raw, what):
    _judge(top, raw, what, "raw")


def main():
    work, depth, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    raw = os.path.join(work, "src.raw")
    rng = random.Random(5)
    with open(raw, "wb") as f:
        while f.tell() < 24 * MiB:
            f.write(f"line {f.tell()} {rng.random()}\n".encode())
        f.truncate(24 * MiB)
    base = os.path.join(work, "base.qcow2")
    sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, base)
    sh("mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", mnt)
    top = os.path.join(mnt, "top.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    if sys.argv[4:] == ["stop"]:
        with blockpull.open(top) as img:
            job = img.pull(compressed="keep", read_depth=depth, chunk=chunk, on_error="stop")
            t0 = time.monotonic()
            while job.status != "paused":
                assert not job.done(), f"ended instead of pausing: {job.error!r}"
                assert time.monotonic() - t0 < 60, "never paused"
                time.sleep(0.01)
            judge(top, raw, "paused on ENOSPC")
            assert top_map(top), "nothing copied stayed linked"
            sh("mount", "-o", "remount,size=64M", mnt)
            job.resume()
            job.result(timeout=120)
            assert img.backing is None
        judge(top, raw, "after the resumed pull")
        sh("umount", mnt)
        print("ok")
        return
    with blockpull.open(top) as img:
        job = img.pull(compressed="keep", read_depth=depth, chunk=chunk)
        try:
            job.result(timeout=120)
            raise AssertionError("the pull did not fail on a full disk")
        except blockpull.PullError as exc:
            assert exc.errno == errno.ENOSPC and exc.operation == "write", exc
        assert job.info().compressed == "keep", job.info()
        assert img.backing_name == base
    judge(top, raw, "after ENOSPC")
    kept = top_map(top)
    assert kept, "nothing copied stayed linked"
    assert all(e.get("compressed", True) for e in kept), kept
    sh("mount", "-o", "remount,size=64M", mnt)
    with blockpull.open(top) as img:
        img.pull(compressed="keep").result(timeout=120)
        assert img.backing is None
    judge(top, raw, "after the pull with room")
    r = sh("qemu-img", "check", top)
    assert "100.00% compressed clusters" in r.stdout, r.stdout
    sh("umount", mnt)
    print("ok")


if __name__ == "__main__":
    main()
