"""One NBD client connection: the handshake, then pipelined requests until it ends.

The connection runs as a task on the server's asyncio loop (``blockpull.nbd.server``);
requests run against the one Image through ``blockpull.nbd.export``, small ones on the
loop thread when the image is free, the others on the server's worker threads, and their
replies go out in whatever order they finish, each tagged with its cookie.

Memory per connection is bounded: a request carries at most ``MAX_PAYLOAD`` bytes, at
most ``MAX_IN_FLIGHT`` requests and ``MAX_BYTES_IN_FLIGHT`` bytes of payload are held at
once (the connection stops reading from a client that does not take its replies), and
option data longer than ``MAX_OPTION`` ends the connection. A client that breaks the
protocol loses its own connection; nobody else notices.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
from typing import Any, Callable, List, Optional, Set, Tuple, Union

from blockpull.nbd import protocol as P
from blockpull.nbd.export import MAX_PAYLOAD, Export, FastZeroUnsupported

log = logging.getLogger("blockpull")

__all__ = ["Connection", "MAX_IN_FLIGHT", "MAX_BYTES_IN_FLIGHT", "MAX_OPTION", "MAX_OPTIONS",
           "READ_AHEAD", "INLINE_MAX"]

#: requests one connection may have in flight
MAX_IN_FLIGHT = 64
#: payload bytes (write data in, read data out) one connection may hold at once
MAX_BYTES_IN_FLIGHT = 64 << 20
#: the longest option data accepted during the handshake, bytes
MAX_OPTION = 64 << 10
#: options one handshake may send before the server gives up on it
MAX_OPTIONS = 512
#: bytes read ahead of the request being parsed (transmission phase)
READ_AHEAD = 256 << 10
#: requests up to this many bytes run on the loop thread when the image is free
INLINE_MAX = 256 << 10
_INLINE_TYPES = (P.CMD_READ, P.CMD_WRITE, P.CMD_BLOCK_STATUS)


class _Closed(Exception):
    """The connection is over (the client left, aborted, or broke the protocol)."""


class _Budget:
    """Requests and payload bytes in flight on one connection (loop thread only)."""

    def __init__(self) -> None:
        self.count = 0
        self.nbytes = 0
        self._waiter: Optional[asyncio.Future] = None

    def _fits(self, nbytes: int) -> bool:
        # a request bigger than the whole budget waits until it is alone
        return self.count < MAX_IN_FLIGHT and \
            (self.nbytes + nbytes <= MAX_BYTES_IN_FLIGHT or self.count == 0)

    async def acquire(self, nbytes: int) -> None:
        while not self._fits(nbytes):
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self.count += 1
        self.nbytes += nbytes

    def release(self, nbytes: int) -> None:
        self.count -= 1
        self.nbytes -= nbytes
        w = self._waiter
        if w is not None and not w.done():
            self._waiter = None
            w.set_result(None)

    async def idle(self) -> None:
        while self.count:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


class Connection:
    """One client: handshake, then requests until it disconnects or the server closes.

    ``export`` is the served image, ``tls`` the server's TLS context (None: no TLS),
    ``pool`` the worker threads requests run on, ``closing()`` True once the server is
    closing (no new options or requests are taken then).
    """

    def __init__(self, export: Export, tls: Optional[ssl.SSLContext],
                 pool: concurrent.futures.Executor, closing: Callable[[], bool],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.export = export
        self.tls = tls
        self.pool = pool
        self.closing = closing
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.contexts: List[Tuple[int, str]] = []
        self.no_zeroes = False
        self.tls_active = False
        self.budget = _Budget()
        self.inbuf = bytearray()    # transmission phase: requests read but not parsed

    # ---- plumbing ------------------------------------------------------------------------

    async def _read(self, n: int) -> bytes:
        try:
            return await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            raise _Closed(str(exc)) from exc

    async def _send(self, data: Union[bytes, List[Any]]) -> None:
        if self.writer.is_closing():
            raise _Closed("connection closed")
        if isinstance(data, (bytes, bytearray)):
            self.writer.write(data)
        else:
            self._write_parts(data)
        try:
            await self.writer.drain()
        except (ConnectionError, ssl.SSLError) as exc:
            raise _Closed(str(exc)) from exc

    # ---- the whole conversation ----------------------------------------------------------

    async def run(self) -> None:
        """Serve the client until it leaves, breaks the protocol or the server closes;
        the requests in flight are answered first. Never raises."""
        try:
            if await self._handshake():
                await self._transmission()
        except _Closed as exc:
            log.debug("NBD connection closed: %s", exc)
        except P.ProtocolError as exc:
            log.info("NBD client broke the protocol, connection closed: %s", exc)
        except asyncio.CancelledError:
            pass
        except Exception:  # never let one connection take the server down
            log.exception("NBD connection failed")
        finally:
            await self._drain_in_flight()
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except BaseException:
                pass

    def abort(self) -> None:
        """Drop the connection at once (replies not yet taken are lost)."""
        self.writer.transport.abort()

    async def _drain_in_flight(self) -> None:
        try:
            await asyncio.shield(self.budget.idle())
        except BaseException:
            pass

    # ---- handshake -------------------------------------------------------------------------

    async def _handshake(self) -> bool:
        """Fixed newstyle negotiation; True when transmission starts."""
        await self._send(P.greeting())
        (cflags,) = P.U32.unpack(await self._read(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise P.ProtocolError(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        tls_required = self.tls is not None
        for _ in range(MAX_OPTIONS):
            magic, opt, length = P.OPTION_HEADER.unpack(await self._read(16))
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise P.ProtocolError(f"option {opt} carries {length} bytes (at most {MAX_OPTION})")
            data = await self._read(length) if length else b""
            if self.closing():
                if opt == P.OPT_ABORT:
                    await self._send(P.option_reply(opt, P.REP_ACK))
                    return False
                if opt == P.OPT_EXPORT_NAME:
                    return False
                await self._send(P.option_reply(opt, P.REP_ERR_SHUTDOWN, b"server shutting down"))
                continue
            if tls_required and not self.tls_active and opt not in (P.OPT_STARTTLS, P.OPT_ABORT):
                if opt == P.OPT_EXPORT_NAME:
                    raise P.ProtocolError("NBD_OPT_EXPORT_NAME before TLS on a TLS export")
                await self._send(P.option_reply(opt, P.REP_ERR_TLS_REQD, b"start TLS first"))
                continue
            try:
                if await self._option(opt, data):
                    return True
            except P.OptionInvalid as exc:
                await self._send(P.option_reply(opt, P.REP_ERR_INVALID, str(exc).encode()))
            except _Stop:
                return False
        raise P.ProtocolError(f"more than {MAX_OPTIONS} options in one handshake")

    def _known(self, name: bytes) -> bool:
        return name == b"" or name == self.export.name.encode()

    async def _option(self, opt: int, data: bytes) -> bool:
        """Answer one option; True when transmission starts (EXPORT_NAME, GO)."""
        exp = self.export
        if opt == P.OPT_EXPORT_NAME:
            if not self._known(data):
                raise P.ProtocolError(f"unknown export {data[:64]!r}")
            await self._send(P.export_name_reply(exp.size, exp.transmission_flags(self.structured),
                                                 self.no_zeroes))
            return True
        if opt == P.OPT_ABORT:
            await self._send(P.option_reply(opt, P.REP_ACK))
            raise _Stop()
        if opt == P.OPT_LIST:
            if data:
                raise P.OptionInvalid("NBD_OPT_LIST takes no data")
            await self._send(P.option_reply(opt, P.REP_SERVER, P.server_entry(exp.name.encode())))
            await self._send(P.option_reply(opt, P.REP_ACK))
            return False
        if opt == P.OPT_STARTTLS:
            await self._starttls(opt, data)
            return False
        if opt in (P.OPT_INFO, P.OPT_GO):
            return await self._info(opt, data)
        if opt == P.OPT_STRUCTURED_REPLY:
            if data:
                raise P.OptionInvalid("NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            await self._send(P.option_reply(opt, P.REP_ACK))
            return False
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            await self._meta_context(opt, data)
            return False
        await self._send(P.option_reply(opt, P.REP_ERR_UNSUP, b"option not supported"))
        return False

    async def _starttls(self, opt: int, data: bytes) -> None:
        """NBD_OPT_STARTTLS: upgrade the connection; what was negotiated before is reset."""
        if self.tls is None:
            await self._send(P.option_reply(opt, P.REP_ERR_UNSUP, b"TLS is not configured"))
            return
        if self.tls_active or data:
            raise P.OptionInvalid("TLS already started" if self.tls_active
                                  else "NBD_OPT_STARTTLS takes no data")
        await self._send(P.option_reply(opt, P.REP_ACK))
        try:
            await self.writer.start_tls(self.tls)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            raise _Closed(f"TLS handshake failed: {exc}") from exc
        self.tls_active = True
        self.structured = False
        self.contexts = []

    async def _info(self, opt: int, data: bytes) -> bool:
        """NBD_OPT_INFO / NBD_OPT_GO: the export's size, flags and block sizes; True when
        GO starts transmission."""
        exp = self.export
        name, wanted = P.parse_info_request(data)
        if not self._known(name):
            await self._send(P.option_reply(opt, P.REP_ERR_UNKNOWN,
                                            b"no such export: " + name[:256]))
            return False
        replies = [P.info_export(exp.size, exp.transmission_flags(self.structured)),
                   P.info_block_size(*exp.block_size())]
        if P.INFO_NAME in wanted:
            replies.append(P.info_name(exp.name.encode()))
        for r in replies:
            await self._send(P.option_reply(opt, P.REP_INFO, r))
        await self._send(P.option_reply(opt, P.REP_ACK))
        return opt == P.OPT_GO

    async def _meta_context(self, opt: int, data: bytes) -> None:
        """NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT (structured replies only)."""
        listing = opt == P.OPT_LIST_META_CONTEXT
        if not listing:
            self.contexts = []
        if not self.structured:
            raise P.OptionInvalid("negotiate structured replies first")
        name, queries = P.parse_meta_request(data)
        if not self._known(name):
            await self._send(P.option_reply(opt, P.REP_ERR_UNKNOWN,
                                            b"no such export: " + name[:256]))
            return
        found = P.match_contexts(queries, listing)
        for ctx in found:
            cid = 0 if listing else P.CONTEXTS[ctx]
            await self._send(P.option_reply(opt, P.REP_META_CONTEXT, P.meta_context(cid, ctx)))
        if not listing:
            self.contexts = [(P.CONTEXTS[c], c) for c in found]
        await self._send(P.option_reply(opt, P.REP_ACK))

    # ---- transmission -----------------------------------------------------------------------

    async def _transmission(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: Set[asyncio.Task] = set()
        try:
            while True:
                if self.closing():
                    break
                req = await self._next_request()
                if req.type == P.CMD_DISC:
                    break
                payload = None
                cost = 0
                if req.type == P.CMD_WRITE:
                    if req.length > MAX_PAYLOAD:
                        await self._discard(req.length)
                        await self._reply_error(req, P.EOVERFLOW,
                                                f"write of {req.length} bytes: at most {MAX_PAYLOAD}")
                        continue
                    cost = req.length
                    await self.budget.acquire(cost)
                    try:
                        payload = await self._take(req.length)
                    except BaseException:
                        self.budget.release(cost)
                        raise
                else:
                    if req.type == P.CMD_READ and req.length <= MAX_PAYLOAD:
                        cost = req.length
                    await self.budget.acquire(cost)
                try:
                    inline = self._inline(req, payload)
                except BaseException:
                    self.budget.release(cost)
                    raise
                if inline:
                    self.budget.release(cost)
                    if self.writer.transport.get_write_buffer_size() > INLINE_MAX:
                        await self._send(b"")
                    continue
                t = loop.create_task(self._serve(req, payload, cost))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        finally:
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)

    def _inline(self, req: P.Request, payload: Optional[bytes]) -> bool:
        """Carry out a small request at once on the loop thread when the image is free
        (no thread hand-off: most of a small request's cost); False to hand it to a
        worker (big, flushing, or the image busy, e.g. with the pull's metadata)."""
        if req.length > INLINE_MAX or req.type not in _INLINE_TYPES or \
                req.flags & P.CMD_FLAG_FUA:
            return False
        lock = self.export.image.lock
        if not lock.acquire(False):
            return False
        try:
            parts = self._execute(req, payload)
        finally:
            lock.release()
        if self.writer.is_closing():
            raise _Closed("connection closed")
        self._write_parts(parts)
        return True

    def _write_parts(self, parts: List[Any]) -> None:
        """Hand a reply to the transport; big data buffers go as they are (joining them
        with their headers would copy every byte once more)."""
        if len(parts) == 1:
            self.writer.write(parts[0])
            return
        small: List[Any] = []
        for p in parts:
            if len(p) >= 16384:
                if small:
                    self.writer.write(b"".join(small))
                    small = []
                self.writer.write(p)
            else:
                small.append(p)
        if small:
            self.writer.write(b"".join(small))

    async def _fill(self, n: int) -> None:
        """Read until ``n`` bytes of requests are buffered (reading ahead at most
        ``READ_AHEAD`` more: many small requests arrive with one read)."""
        buf = self.inbuf
        while len(buf) < n:
            try:
                chunk = await self.reader.read(max(n - len(buf), READ_AHEAD))
            except (ConnectionError, ssl.SSLError) as exc:
                raise _Closed(str(exc)) from exc
            if not chunk:
                raise _Closed("the client closed the connection")
            buf += chunk

    async def _next_request(self) -> P.Request:
        size = P.REQUEST.size
        if len(self.inbuf) < size:
            await self._fill(size)
        req = P.parse_request_from(self.inbuf)
        del self.inbuf[:size]
        return req

    async def _take(self, n: int) -> bytes:
        if len(self.inbuf) < n:
            await self._fill(n)
        with memoryview(self.inbuf) as mv:
            out = bytes(mv[:n])
        del self.inbuf[:n]
        return out

    async def _discard(self, n: int) -> None:
        while n:
            k = min(n, 1 << 20)
            await self._take(k)
            n -= k

    async def _reply_error(self, req: P.Request, error: int, message: str) -> None:
        await self._send(self._error(req, error, message))

    def _error(self, req: P.Request, error: int, message: str) -> List[bytes]:
        if self.structured:
            return [P.chunk_error(req.cookie, error, message)]
        return [P.simple_reply(req.cookie, error)]

    async def _serve(self, req: P.Request, payload: Optional[bytes], cost: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                parts = await loop.run_in_executor(self.pool, self._execute, req, payload)
            except Exception as exc:  # the executor itself refused (shutting down)
                parts = self._error(req, P.ESHUTDOWN, str(exc))
            payload = None
            await self._send(parts)
        except _Closed:
            pass
        finally:
            self.budget.release(cost)

    # runs on a worker thread: check the request, carry it out, build the reply
    def _execute(self, req: P.Request, payload: Optional[bytes]) -> List[Any]:
        try:
            return self._do(req, payload)
        except FastZeroUnsupported:
            return self._error(req, P.ENOTSUP, "zeroing this range is no faster than writing")
        except Exception as exc:
            err = P.nbd_errno(exc)
            if err == P.EIO:
                log.warning("NBD request %d at %d+%d failed: %s", req.type, req.offset,
                            req.length, exc)
            return self._error(req, err, str(exc))

    def _do(self, req: P.Request, payload: Optional[bytes]) -> List[Any]:
        exp = self.export
        typ, flags, off, n = req.type, req.flags, req.offset, req.length
        allowed = P.CMD_FLAGS.get(typ)
        if allowed is None:
            return self._error(req, P.EINVAL, f"unknown command {typ}")
        if flags & ~allowed or (flags & P.CMD_FLAG_DF and not self.structured):
            return self._error(req, P.EINVAL, f"flags {flags:#x} not valid for command {typ}")
        fua = bool(flags & P.CMD_FLAG_FUA) and not exp.readonly
        writes = typ in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)
        if writes and exp.readonly:
            return self._error(req, P.EPERM, "the export is read-only")
        if typ == P.CMD_FLUSH:
            if off or n:
                return self._error(req, P.EINVAL, "flush takes no offset or length")
            if not exp.readonly:
                exp.flush()
            return self._ok(req)
        if typ == P.CMD_READ and n > MAX_PAYLOAD:
            return self._error(req, P.EOVERFLOW, f"read of {n} bytes: at most {MAX_PAYLOAD}")
        if off + n > exp.size:
            err = P.ENOSPC if typ in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            return self._error(req, err, f"range {off}+{n} beyond the export size {exp.size}")
        if typ == P.CMD_READ:
            return self._read_reply(req)
        if typ == P.CMD_WRITE:
            if n:
                exp.write(off, payload, fua)
            return self._ok(req)
        if typ == P.CMD_WRITE_ZEROES:
            if n:
                exp.write_zeroes(off, n, fua, bool(flags & P.CMD_FLAG_NO_HOLE),
                                 bool(flags & P.CMD_FLAG_FAST_ZERO))
            return self._ok(req)
        if typ == P.CMD_TRIM:
            if n:
                exp.trim(off, n, fua)
            return self._ok(req)
        if typ == P.CMD_CACHE:
            if n:
                exp.cache(off, n)
            return self._ok(req)
        if typ == P.CMD_BLOCK_STATUS:
            if not self.structured or not self.contexts:
                return self._error(req, P.EINVAL, "no metadata context was negotiated")
            if n == 0:
                return self._error(req, P.EINVAL, "block status of an empty range")
            one = bool(flags & P.CMD_FLAG_REQ_ONE)
            parts = []
            for i, (cid, name) in enumerate(self.contexts):
                ext = exp.block_status(off, n, name, one)
                parts.append(P.chunk_block_status(req.cookie, cid, ext,
                                                  i == len(self.contexts) - 1))
            return parts
        return self._error(req, P.EINVAL, f"command {typ} not supported")  # pragma: no cover

    def _ok(self, req: P.Request) -> List[bytes]:
        if self.structured:
            return [P.chunk_none(req.cookie)]
        return [P.simple_reply(req.cookie)]

    def _read_reply(self, req: P.Request) -> List[Any]:
        exp = self.export
        off, n, cookie = req.offset, req.length, req.cookie
        if not self.structured:
            buf = bytearray(n)
            if n:
                exp.readinto(off, buf)
            return [P.simple_reply(cookie), buf]
        if n == 0:
            return [P.chunk_none(cookie)]
        plan = exp.read_plan(off, n)
        if req.flags & P.CMD_FLAG_DF or len(plan) == 1 and not plan[0][2]:
            # one data chunk (zeros explicit where a hole lies inside)
            buf = bytearray(n)
            mv = memoryview(buf)
            for start, length, zero in plan:
                if not zero:
                    exp.readinto(start, mv[start - off:start - off + length])
            return [P.chunk_data_header(cookie, off, n, True), buf]
        parts: List[Any] = []
        buf = bytearray(sum(length for _s, length, zero in plan if not zero))
        mv = memoryview(buf)
        pos = 0
        for i, (start, length, zero) in enumerate(plan):
            last = i == len(plan) - 1
            if zero:
                parts.append(P.chunk_hole(cookie, start, length, last))
            else:
                piece = mv[pos:pos + length]
                exp.readinto(start, piece)
                parts.append(P.chunk_data_header(cookie, start, length, last))
                parts.append(piece)
                pos += length
        return parts


class _Stop(Exception):
    """The client aborted the handshake."""

