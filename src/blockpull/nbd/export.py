"""What each NBD request does to the served Image.

Every request of every connection goes through the one ``blockpull.Image`` (its lock
serialises metadata changes with the pull), so guest writes win over the pull, reads copy
on read as the Image is opened, and the backing link drops under the clients without them
seeing a change. These functions run on the server's worker threads and raise on failure;
the transport turns exceptions into NBD error values (``protocol.nbd_errno``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Tuple

from blockpull._driver import COMPRESSED, DATA, UNALLOC, ZERO
from blockpull.nbd import protocol as P

if TYPE_CHECKING:  # pragma: no cover
    from blockpull.image import Image

#: the largest READ/WRITE payload a request may carry, bytes (advertised maximum)
MAX_PAYLOAD = 32 << 20
#: commands without payload (WRITE_ZEROES, TRIM, CACHE) work in pieces this big, so the
#: image lock is never held for long and no buffer grows with the request
STEP = 32 << 20
#: at most this many extents answer one BLOCK_STATUS (the client asks again for the rest)
MAX_EXTENTS = 4096

_ZEROS = bytes(1 << 20)


class FastZeroUnsupported(Exception):
    """NBD_CMD_FLAG_FAST_ZERO was asked where zeroing is no faster than writing."""


class Export:
    """One served image: its size, flags and the request operations on it."""

    def __init__(self, image: "Image", name: str = "", readonly: bool = False) -> None:
        self.image = image
        self.name = name
        self.readonly = readonly or image.readonly
        self.size = image.size
        cs = image.cluster_size
        self.preferred = max(512, cs)

    # ---- negotiation facts ----------------------------------------------------------------

    def transmission_flags(self, structured: bool) -> int:
        """Honest flags: read-only exports refuse writes; SEND_* only for what works."""
        f = P.TFLAG_HAS_FLAGS | P.TFLAG_CAN_MULTI_CONN | P.TFLAG_SEND_CACHE
        if structured:
            f |= P.TFLAG_SEND_DF
        if self.readonly:
            f |= P.TFLAG_READ_ONLY
        else:
            f |= (P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM |
                  P.TFLAG_SEND_WRITE_ZEROES | P.TFLAG_SEND_FAST_ZERO)
        return f

    def block_size(self) -> Tuple[int, int, int]:
        """(minimum, preferred, maximum payload): 1 byte, the cluster size, 32 MiB."""
        return 1, self.preferred, MAX_PAYLOAD

    # ---- helpers -----------------------------------------------------------------------

    def _top(self):
        return self.image.chain_obj.layers[0]

    def _fast_zero(self) -> bool:
        """Zeroing is metadata only where the top records zero clusters (qcow2 v3)."""
        top = self._top()
        return top.format == "qcow2" and bool(top.has_zero_flag)

    def _runs(self, offset: int, length: int) -> List[Tuple[int, int, int, int]]:
        """(start, length, depth, kind) runs of the chain over the range, in order."""
        img = self.image
        out: List[Tuple[int, int, int, int]] = []
        pos, end = offset, offset + length
        with img.lock:
            chain = img.chain_obj
            while pos < end:
                depth, kind, run, _host = chain.find(pos, end - pos)
                run = min(run, end - pos)
                out.append((pos, run, depth, kind))
                pos += run
                if len(out) >= MAX_EXTENTS:
                    break
        return out

    # ---- requests ------------------------------------------------------------------------

    def read_plan(self, offset: int, length: int) -> List[Tuple[int, int, bool]]:
        """(start, length, reads_as_zero) pieces covering the range, neighbours merged.
        Zero pieces are zero clusters or unallocated in the whole chain."""
        out: List[Tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            for start, run, _d, kind in self._runs(pos, end - pos):
                zero = kind in (ZERO, UNALLOC)
                if out and out[-1][2] == zero:
                    s, n, z = out[-1]
                    out[-1] = (s, n + run, z)
                else:
                    out.append((start, run, zero))
                pos = start + run
        return out

    def readinto(self, offset: int, buf) -> None:
        """Read through the chain (copying on read if the image does)."""
        self.image.readinto(offset, buf)

    def write(self, offset: int, data, fua: bool) -> None:
        self.image.write(offset, data)
        if fua:
            self.image.flush()

    def flush(self) -> None:
        self.image.flush()

    def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool,
                     fast: bool) -> None:
        """Make the range read as zeros. With NO_HOLE zeros are written as data (the range
        stays provisioned); otherwise zero clusters, which never let a backing file show
        through. FAST_ZERO fails at once unless zeroing is metadata only."""
        if fast and (no_hole or not self._fast_zero()):
            raise FastZeroUnsupported()
        pos, end = offset, offset + length
        while pos < end:
            if no_hole:
                n = min(len(_ZEROS), end - pos)
                self.image.write(pos, memoryview(_ZEROS)[:n])
            else:
                n = min(STEP, end - pos)
                self.image.write_zeroes(pos, n)
            pos += n
        if fua:
            self.image.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Discard: whole clusters become zero clusters where that is metadata only
        (qcow2 v3), so nothing inherited can show through; elsewhere nothing changes,
        which the protocol allows (a trim is a hint)."""
        if not self._fast_zero():
            return
        cs = self.image.cluster_size
        start = -(-offset // cs) * cs
        stop = (offset + length) // cs * cs
        if offset + length == self.size:
            stop = offset + length        # the last, partial cluster is whole too
        if stop > start:
            self.write_zeroes(start, stop - start, fua, False, False)

    def cache(self, offset: int, length: int) -> None:
        """Pull the range into the top now (what a later read would copy on read)."""
        img = self.image
        if self.readonly:
            return
        pos, end = offset, offset + length
        while pos < end:
            n = min(STEP, end - pos)
            img.pull_range(pos, n)
            pos += n

    def block_status(self, offset: int, length: int, context: str,
                     one: bool) -> List[Tuple[int, int]]:
        """(length, flags) extents from ``offset`` for one metadata context, neighbours
        with equal flags merged; at most one with ``one`` (REQ_ONE).

        base:allocation: HOLE where nothing reads as data, ZERO where it reads as zeros
        (as ``qemu-img map`` says data/zero). qemu:allocation-depth: 0 unallocated in the
        whole chain, 1 the top, 2 its backing file, and so on."""
        out: List[Tuple[int, int]] = []
        for _start, run, depth, kind in self._runs(offset, length):
            if context == P.CONTEXT_ALLOCATION:
                flags = 0
                if kind not in (DATA, COMPRESSED):
                    flags |= P.STATE_HOLE
                if kind in (ZERO, UNALLOC):
                    flags |= P.STATE_ZERO
            else:
                flags = 0 if kind == UNALLOC else depth + 1
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + run, flags)
            else:
                if one and out:
                    break
                out.append((run, flags))
        return out
