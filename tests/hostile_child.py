"""Open, map and read (or write) one image under a 2 GiB address-space limit; print JSON.

Run as ``python hostile_child.py IMAGE MODE``; MODE is "read" (open read-only, map, read
the first 64 MiB, check) or "write" (open read-write, write the last cluster, flush). Every file
read is watched: a read that starts at or past the end of its file is reported as
``outside`` (the format probe of the first bytes of an empty file excepted). Exit status 0 with one JSON line on stdout, whatever the image holds; any
exception that is not a BlockpullError propagates (non-zero exit, traceback on stderr).
"""
import json
import os
import resource
import sys
import time

LIMIT = 2 << 30
resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

import blockpull  # noqa: E402
import blockpull.image  # noqa: E402
from blockpull._fileio import File  # noqa: E402

outside = []


class Watch:
    """Fault hook that only watches: records reads starting past the end of the file."""

    def __init__(self, path):
        self.path = path

    def check(self, op, role, offset, length):
        if op == "read" and length and offset > 0 and offset >= os.path.getsize(self.path):
            outside.append((self.path, offset, length))
        return 0

    def record(self, op, path, offset, data):
        pass


class WatchedFile(File):
    def __init__(self, path, *args, **kwargs):
        super().__init__(path, *args, **kwargs)
        self.faults = Watch(path)


blockpull.image.File = WatchedFile
sys.modules["blockpull.checker"].File = WatchedFile   # the module, not the function


def main(path, mode):
    out = {"ok": True}
    t0 = time.monotonic()
    try:
        if mode == "read":
            with blockpull.open(path, readonly=True) as img:
                img.map()
                pos, end = 0, min(img.size, 64 << 20)
                while pos < end:
                    n = min(1 << 20, end - pos)
                    img.read(pos, n)
                    pos += n
        else:
            with blockpull.open(path) as img:
                n = min(img.cluster_size, img.size)
                img.write(img.size - n, b"\x5a" * n)   # the last cluster: allocates
                img.flush()
    except blockpull.BlockpullError as exc:
        out = {"ok": False, "type": type(exc).__name__, "msg": str(exc)}
    out["seconds"] = time.monotonic() - t0
    # the checker must not crash on the image either: a result or a named error
    try:
        r = blockpull.check(path)
        out["check"] = r.exit_code
    except blockpull.BlockpullError as exc:
        out["check"] = type(exc).__name__
    out["outside"] = outside
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
