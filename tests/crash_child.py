"""The process test_crash.py kills: pulls an image (and writes to it as a guest would).

    python crash_child.py TOP BASE|- KILL_AT WRITES_SEED CHUNK BATCH [COMPRESSED] [ROLE]

KILL_AT: 0 = run to the end (the parent kills it from outside at a random moment, or it
finishes and prints the number of top writes and syncs it made); N > 0 = SIGKILL itself
just before the N-th write or sync of the top file (of the files in ROLE, default
"top"; "data" for the top's external data file). WRITES_SEED: 0 = no guest writes;
otherwise a writer thread writes non-overlapping random extents while the pull runs and
flushes now and then, printing "flushed I" once the flush of write I returned.
COMPRESSED: the pull's ``compressed`` ("inflate" by default, or "keep").
"""
import random
import sys
import threading

import blockpull
from blockpull import faults

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from relhelp import guest_extents  # noqa: E402


def main() -> None:
    top, base, kill_at, wseed, chunk, batch = sys.argv[1:7]
    kill_at, wseed, chunk, batch = int(kill_at), int(wseed), int(chunk), int(batch)
    compressed, role = "inflate", "top"
    for arg in sys.argv[7:]:        # either optional argument, in any order
        if arg in ("inflate", "keep"):
            compressed = arg
        else:
            role = arg
    img = blockpull.open(top, backing_format="qcow2")
    inj = faults.FaultInjector(record_writes=False)
    if kill_at:
        inj.kill_at(role=role, nth=kill_at, match=lambda op, role, off, n: op != "read")
    faults.attach(img, inj)
    out = sys.stdout
    writer = None
    if wseed:
        rng = random.Random(wseed)
        ext = guest_extents(rng, img.size, 40)

        def write_all() -> None:
            pending = []
            for i, (off, n) in enumerate(ext):
                img.write(off, random.Random(wseed * 1000 + i).randbytes(n))
                pending.append(i)
                if rng.random() < 0.3 or i == len(ext) - 1:
                    img.flush()
                    for j in pending:
                        out.write(f"flushed {j}\n")
                    out.flush()
                    pending = []
        writer = threading.Thread(target=write_all)
    job = img.pull(base=None if base == "-" else base, chunk=chunk, batch=batch,
                   compressed=compressed)
    out.write("ready\n")
    out.flush()
    if writer is not None:
        writer.start()
        writer.join()
    job.result()
    img.close()
    n = inj.counts.get(("write", "top"), 0) + inj.counts.get(("sync", "top"), 0)
    out.write(f"done {n}\n")
    out.flush()


if __name__ == "__main__":
    main()
