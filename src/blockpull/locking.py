"""QEMU's image lock protocol: which lock bytes an opener takes, and when it refuses.

QEMU takes open-file-description (OFD) byte-range locks on every image it opens (QEMU's
block/file-posix.c: byte ``RAW_LOCK_PERM_BASE`` (100) + i while it holds permission i,
byte ``RAW_LOCK_SHARED_BASE`` (200) + i while it refuses to share permission i; i = 0
consistent read, 1 write, 2 write unchanged, 3 resize; docs/formats.md, "QEMU's image
locks"). Taking the same bytes keeps this package and QEMU out of each other's images.

This module holds the protocol only; the byte-level ``fcntl`` calls are ``File.lock``,
``File.unlock`` and ``File.lock_conflicts`` of ``blockpull._fileio``.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from blockpull._fileio import File
from blockpull.errors import ImageLockedError

__all__ = ["LOCK_GRACE", "PERM_BASE", "SHARED_BASE", "lock_image", "lock_once",
           "without_read_locks"]

#: QEMU's RAW_LOCK_PERM_BASE: byte PERM_BASE + i is held while permission i is held
PERM_BASE = 100
#: QEMU's RAW_LOCK_SHARED_BASE: byte SHARED_BASE + i is held while i is not shared
SHARED_BASE = 200
# QEMU's permission numbers (BLK_PERM_* bit positions)
PERM_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 0, 1, 2, 3

_PERM_NAMES = {PERM_READ: "consistent read", PERM_WRITE: "write",
               PERM_WRITE_UNCHANGED: "write unchanged", PERM_RESIZE: "resize"}

#: how long, in seconds, a lock conflict may last before it is reported (see ``lock_image``)
LOCK_GRACE = 0.25

_shared_reads = threading.local()


@contextlib.contextmanager
def without_read_locks() -> Iterator[None]:
    """Within this block, in this thread, read-only opens take no lock bytes (QEMU's
    force-share, ``qemu-img -U``): they neither see nor stop a writer. Writable opens
    still lock."""
    before = getattr(_shared_reads, "on", False)
    _shared_reads.on = True
    try:
        yield
    finally:
        _shared_reads.on = before


def lock_image(f: File, writable: bool, path: str) -> None:
    """Take the lock bytes (``lock_once``), trying again for ``LOCK_GRACE`` seconds on
    a conflict before refusing. Raises ImageLockedError.

    A conflict can be a ghost: when any thread of a program forks (to start any other
    program), the child holds a copy of every descriptor until it execs, and with it
    the OFD locks of an image that was just closed. Reopening that image at that moment
    would be refused although nobody uses it; the window lasts far less than the grace.
    """
    if not writable and getattr(_shared_reads, "on", False):
        return None
    deadline = time.monotonic() + LOCK_GRACE
    while True:
        try:
            return lock_once(f, writable, path)
        except ImageLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def lock_once(f: File, writable: bool, path: str) -> None:
    """Take QEMU's OFD lock bytes as a qcow2 node of QEMU takes them, refusing on conflict
    (ImageLockedError).

    A writer holds consistent read, write and resize (bytes 100, 101, 103) and refuses
    to share write and resize (201, 203); a reader holds consistent read (100) and
    refuses to share write and resize as well, so neither opens an image that a VM or
    another pull writes (``qemu-img info`` without ``-U`` refuses the same way). As in
    QEMU, the bytes are taken first and conflicts tested after, so two openers racing
    cannot both miss each other.
    """
    perms = [PERM_READ, PERM_WRITE, PERM_RESIZE] if writable else [PERM_READ]
    unshared = [PERM_WRITE, PERM_RESIZE]
    taken = []
    try:
        for b in [PERM_BASE + p for p in perms] + [SHARED_BASE + p for p in unshared]:
            if not f.lock(b, False):
                raise ImageLockedError(
                    f"{path}: lock byte {b} is held exclusively by another process; "
                    f"close the program that uses it first")
            taken.append(b)
        for p in perms:
            if f.lock_conflicts(SHARED_BASE + p, True):
                raise ImageLockedError(
                    f"{path}: another process (a VM or a pull) refuses to share "
                    f"{_PERM_NAMES[p]} access; stop it first, or use its own interface")
        for p in unshared:
            if f.lock_conflicts(PERM_BASE + p, True):
                raise ImageLockedError(
                    f"{path}: another process (a VM or a pull) has it open with "
                    f"{_PERM_NAMES[p]} access; stop it first, or use its own interface")
    except BaseException:
        for b in taken:
            f.unlock(b)
        raise
