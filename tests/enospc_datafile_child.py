"""A pull of a qcow2 top whose external data file lives on a file system that fills
mid-pull, run by test_enospc.py inside a private mount namespace.

    python enospc_datafile_child.py WORK_DIR CASE
        # CASE: one-big-chunk | four-in-flight | extl2 | stop

An ext4 file system on a loop device (64 MiB, a filler file leaving about 10 MiB free)
holds the data file; the image file and its 40 MiB backing (every fourth cluster all
zeros, so that a chunk is written to the data file in several runs; raw, so that
the plan is one run and the zeros are found in the chunks read) live outside it.
The pull must fail (or pause, CASE "stop") on ENOSPC and keep the clusters whose bytes
reached the data file: ``qemu-img check`` clean, the image reads as the chain did, the
backing link kept; with one big chunk every whole cluster the data file holds is
linked. Once the filler is gone a new pull (or the resumed one) completes and the image
equals the chain. CASE "extl2": extended L2 entries, the top already holding some
subclusters of the clusters to pull. Exit 0 and "ok" when all holds.
"""
import errno
import os
import random
import sys
import time

import blockpull
from childhelp import backing_of, judge, sh, top_map

MiB = 1 << 20
CS = 64 << 10


def top_extents(path):
    """The ranges the top itself maps; in a data file they are at their guest offsets."""
    return [(e["start"], e["start"] + e["length"]) for e in top_map(path)]


def top_bytes(path):
    """Bytes the top itself maps (qemu-img map: depth 0, data)."""
    return sum(b - a for a, b in top_extents(path))


def data_extents(path):
    """The extents of ``path`` that hold data (SEEK_DATA/SEEK_HOLE), as (start, end)."""
    out, pos = [], 0
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while pos < end:
            try:
                pos = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break
            hole = os.lseek(f.fileno(), pos, os.SEEK_HOLE)
            out.append((pos, hole))
            pos = hole
    return out


def clusters(extents):
    """The whole clusters within ``extents`` (byte ranges), as cluster numbers."""
    return {c for a, b in extents for c in range((a + CS - 1) // CS, b // CS)}


def make_chain(work, mnt, case):
    raw = os.path.join(work, "src.raw")
    rng = random.Random(15)
    with open(raw, "wb") as f:
        for c in range(40 * MiB // CS):
            f.write(bytes(CS) if c % 4 == 3 else rng.randbytes(CS))
    base = raw     # a raw backing: one run to plan, the zeros found in each chunk read
    top = os.path.join(work, "top.qcow2")
    opts = f"data_file={os.path.join(mnt, 'top.data')}"
    if case == "extl2":
        opts += ",extended_l2=on"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", base, "-F", "raw", top,
       "40M")
    if case == "extl2":
        # a few subclusters of the clusters to pull are the top's own already
        cmds = []
        for c in range(0, 40 * MiB // CS, 7):
            cmds += ["-c", f"write -P 0x{c % 251:x} {c * CS + 2048 * (c % 32)} 2048"]
        sh("qemu-io", "-f", "qcow2", *cmds, top)
        want = os.path.join(work, "want.qcow2")
        sh("qemu-img", "convert", "-O", "qcow2", top, want)     # the chain's reading
        return top, want
    return top, base


def main():
    work, case = sys.argv[1:3]
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    fsimg = os.path.join(work, "fs.img")
    with open(fsimg, "wb") as f:
        f.truncate(64 * MiB)
    sh("mkfs.ext4", "-q", "-F", fsimg)
    sh("mount", "-o", "loop", fsimg, mnt)
    try:
        top, want = make_chain(work, mnt, case)
        base = os.path.join(work, "src.raw")
        st = os.statvfs(mnt)
        filler = os.path.join(mnt, "filler")
        sh("fallocate", "-l", str(st.f_bavail * st.f_frsize - 10 * MiB), filler)
        data = os.path.join(mnt, "top.data")
        before = top_bytes(top)
        if case == "stop":
            with blockpull.open(top) as img:
                job = img.pull(on_error="stop")
                t0 = time.monotonic()
                while job.status != "paused":
                    assert not job.done(), f"ended instead of pausing: {job.error!r}"
                    assert time.monotonic() - t0 < 60, "never paused"
                    time.sleep(0.01)
                judge(top, want, "paused on ENOSPC")
                assert top_bytes(top) > before, "nothing copied stayed linked"
                os.unlink(filler)
                job.resume()
                job.result(timeout=120)
                assert img.backing is None
            judge(top, want, "after the resumed pull")
            assert backing_of(top) is None
            print("ok")
            return
        chunk, depth = (64 * MiB, 1) if case == "one-big-chunk" else (1 * MiB, 4)
        with blockpull.open(top) as img:
            job = img.pull(chunk=chunk, read_depth=depth)
            try:
                job.result(timeout=120)
                raise AssertionError("the pull did not fail on a full disk")
            except blockpull.PullError as exc:
                assert exc.errno == errno.ENOSPC and exc.operation == "write", exc
            assert img.backing_name == base
        assert backing_of(top) == base
        judge(top, want, "after ENOSPC")
        kept = top_bytes(top)
        assert kept > before, "nothing copied stayed linked"
        if case == "one-big-chunk":
            # one chunk, written run after run (each run its own extent in the data
            # file: the all-zero clusters between runs are not written): every cluster
            # of the runs before the failing one is linked, nothing that did not reach
            # the file is (the failing run's write may have put data there and still
            # reported none written)
            runs = data_extents(data)
            linked = clusters(top_extents(top))
            assert linked <= clusters(runs), sorted(linked - clusters(runs))
            assert clusters(runs[:-1]) <= linked, sorted(clusters(runs[:-1]) - linked)
            assert len(runs) > 10, runs
        os.unlink(filler)
        with blockpull.open(top) as img:
            img.pull().result(timeout=120)
        assert backing_of(top) is None
        judge(top, want, "after the pull with room")
        print("ok")
    finally:
        sh("umount", mnt, check=False)


if __name__ == "__main__":
    main()
