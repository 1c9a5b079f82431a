"""A 40 MiB pull into an image on a 10 MiB tmpfs, run by test_enospc.py inside a private
mount namespace (``unshare --mount``, or ``--user --map-root-user --mount``).

    python enospc_pull_child.py WORK_DIR MODE [FORMAT]
        # MODE: report | stop | ignore | cli; FORMAT of the overlay: qcow2 (default) | qed

The backing file (40 MiB of data) lives outside the tmpfs, the overlay inside it. The
pull must fail (or pause) on ENOSPC and leave: what it copied linked and durable,
nothing leaked (``qemu-img check`` clean), the image reading as before, the backing
link kept; with room again, a new pull (or the resumed one) completes. MODE "cli" runs
``blockpull pull`` and checks that its error is printed once, with what to do. Exit 0
and "ok" when all holds.
"""
import errno
import os
import subprocess
import sys
import time

import blockpull
from childhelp import backing_of, check_clean, same, sh, top_bytes

MiB = 1 << 20


def main():
    work, mode = sys.argv[1:3]
    fmt = sys.argv[3] if len(sys.argv) > 3 else "qcow2"
    bfmt = "qcow2" if fmt == "qed" else None    # QED records no backing format
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    base = os.path.join(work, "base.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, "40M")
    sh("qemu-io", "-c", "write -P 0x5a 0 40M", base)
    sh("mount", "-t", "tmpfs", "-o", "size=10M", "tmpfs", mnt)
    top = os.path.join(mnt, "top." + fmt)
    sh("qemu-img", "create", "-q", "-f", fmt, "-b", base, "-F", "qcow2", top, "40M")
    if mode == "cli":
        r = subprocess.run([sys.executable, "-m", "blockpull", "pull", top]
                           + (["-F", bfmt] if bfmt else []),
                           capture_output=True, text=True)
        assert r.returncode == 1, (r.returncode, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("blockpull: error:")]
        assert len(errs) == 1 and len(lines) == 1, r.stderr
        assert "no space left" in errs[0] and "pull again to resume" in errs[0], errs[0]
        assert "make room for about" in errs[0], errs[0]
    else:
        events = []
        with blockpull.open(top, backing_format=bfmt) as img:
            job = img.pull(on_error=mode, on_event=lambda e: events.append(e))
            if mode == "stop":
                t0 = time.monotonic()
                while job.status != "paused":
                    assert not job.done(), f"ended instead of pausing: {job.error!r}"
                    assert time.monotonic() - t0 < 60, "never paused"
                    time.sleep(0.01)
                assert events[0].kind == "error" and events[0].error.errno == errno.ENOSPC
                assert "make room" in str(events[0].error), events[0].error
                assert "resume the job" in str(events[0].error), events[0].error
                # paused on a full disk: what was copied is on disk, linked, nothing leaks
                check_clean(top, "paused on ENOSPC")
                same(top, base, "paused on ENOSPC")
                assert top_bytes(top) > 0, "nothing copied stayed linked"
                sh("mount", "-o", "remount,size=64M", mnt)
                job.resume()
                job.result(timeout=120)
                assert [e.kind for e in events] == ["error", "paused", "resumed", "completed"]
            else:
                try:
                    job.result(timeout=120)
                    raise AssertionError("the pull did not fail on a full disk")
                except blockpull.PullError as exc:
                    assert exc.errno == errno.ENOSPC and exc.operation == "write", exc
                    assert "make room" in str(exc), exc
                assert img.backing_name == base
        if mode == "stop":
            assert backing_of(top) is None
            check_clean(top, "after the resumed pull")
            same(top, base, "after the resumed pull")
            sh("umount", mnt)
            print("ok")
            return
    # the pull failed and the image is closed (the disk still full)
    assert backing_of(top) == base
    check_clean(top, f"{mode}: after ENOSPC")
    same(top, base, f"{mode}: after ENOSPC")
    kept = top_bytes(top)
    assert kept > 0, f"{mode}: nothing copied stayed linked"
    # the same pull again, still no room: it fails, but keeps what it had
    with blockpull.open(top, backing_format=bfmt) as img:
        try:
            img.pull().result(timeout=120)
            raise AssertionError("a pull with no room completed")
        except blockpull.PullError as exc:
            assert exc.errno == errno.ENOSPC, exc
    check_clean(top, f"{mode}: after a second pull with no room")
    assert top_bytes(top) >= kept
    # room again: a new pull completes
    sh("mount", "-o", "remount,size=64M", mnt)
    with blockpull.open(top, backing_format=bfmt) as img:
        img.pull().result(timeout=120)
    assert backing_of(top) is None
    check_clean(top, f"{mode}: after the pull with room")
    same(top, base, f"{mode}: after the pull with room")
    sh("umount", mnt)
    print("ok")


if __name__ == "__main__":
    main()
