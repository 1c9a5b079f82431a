"""The NBD transport: listening socket, handshake, pipelined transmission, shutdown.

An asyncio loop on its own thread accepts connections and speaks the protocol; the
requests themselves run on a small pool of worker threads against the one Image
(``blockpull.nbd.export``), so many requests of a connection are in flight at once and
their replies go out in whatever order they finish, each tagged with its cookie.

Memory per connection is bounded: a request carries at most ``MAX_PAYLOAD`` bytes, at
most ``MAX_IN_FLIGHT`` requests and ``MAX_BYTES_IN_FLIGHT`` bytes of payload are held at
once (the server stops reading from a client that does not take its replies), and
option data longer than ``MAX_OPTION`` ends the connection. A client that breaks the
protocol loses its own connection; nobody else notices.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import os
import shutil
import socket as _socket
import ssl
import sys
import tempfile
import threading
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple, Union
from urllib.parse import quote

from blockpull.errors import ServeError
from blockpull.nbd import protocol as P
from blockpull.nbd.export import MAX_PAYLOAD, Export, FastZeroUnsupported

log = logging.getLogger("blockpull")

__all__ = ["Server", "serve", "MAX_IN_FLIGHT", "MAX_BYTES_IN_FLIGHT", "MAX_OPTION",
           "MAX_CONNECTIONS"]

#: requests one connection may have in flight
MAX_IN_FLIGHT = 64
#: payload bytes (write data in, read data out) one connection may hold at once
MAX_BYTES_IN_FLIGHT = 64 << 20
#: the longest option data accepted during the handshake, bytes
MAX_OPTION = 64 << 10
#: options one handshake may send before the server gives up on it
MAX_OPTIONS = 512
#: connections served at once; more are closed at once
MAX_CONNECTIONS = 256
#: bytes a served pull copies per step: the copy loop reads each step from the chain
#: under the image lock, so clients wait at most that long; 1 MiB copies as fast as the
#: default 8 MiB here and cuts those waits eightfold
PULL_CHUNK = 1 << 20
#: bytes read ahead of the request being parsed (transmission phase)
READ_AHEAD = 256 << 10
#: seconds close() waits for clients to take the replies of their requests in flight
CLOSE_GRACE = 30.0
#: worker threads carrying out requests
WORKERS = 4
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


class _Connection:
    """One client: handshake, then requests until it disconnects or the server closes."""

    def __init__(self, server: "Server", reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.export = server._export
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.contexts: List[Tuple[int, str]] = []
        self.no_zeroes = False
        self.tls_active = False
        self.budget = _Budget()
        self.reading = False        # waiting for the next request header
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
        tls_required = self.server._ssl is not None
        for _ in range(MAX_OPTIONS):
            magic, opt, length = P.OPTION_HEADER.unpack(await self._read(16))
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise P.ProtocolError(f"option {opt} carries {length} bytes (at most {MAX_OPTION})")
            data = await self._read(length) if length else b""
            if self.server._closing:
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
            if self.server._ssl is None:
                await self._send(P.option_reply(opt, P.REP_ERR_UNSUP, b"TLS is not configured"))
                return False
            if self.tls_active or data:
                raise P.OptionInvalid("TLS already started" if self.tls_active
                                      else "NBD_OPT_STARTTLS takes no data")
            await self._send(P.option_reply(opt, P.REP_ACK))
            try:
                await self.writer.start_tls(self.server._ssl)
            except (ssl.SSLError, ConnectionError, OSError) as exc:
                raise _Closed(f"TLS handshake failed: {exc}") from exc
            self.tls_active = True
            self.structured = False
            self.contexts = []
            return False
        if opt in (P.OPT_INFO, P.OPT_GO):
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
        if opt == P.OPT_STRUCTURED_REPLY:
            if data:
                raise P.OptionInvalid("NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            await self._send(P.option_reply(opt, P.REP_ACK))
            return False
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            listing = opt == P.OPT_LIST_META_CONTEXT
            if not listing:
                self.contexts = []
            if not self.structured:
                raise P.OptionInvalid("negotiate structured replies first")
            name, queries = P.parse_meta_request(data)
            if not self._known(name):
                await self._send(P.option_reply(opt, P.REP_ERR_UNKNOWN,
                                                b"no such export: " + name[:256]))
                return False
            found = P.match_contexts(queries, listing)
            for ctx in found:
                cid = 0 if listing else P.CONTEXTS[ctx]
                await self._send(P.option_reply(opt, P.REP_META_CONTEXT, P.meta_context(cid, ctx)))
            if not listing:
                self.contexts = [(P.CONTEXTS[c], c) for c in found]
            await self._send(P.option_reply(opt, P.REP_ACK))
            return False
        await self._send(P.option_reply(opt, P.REP_ERR_UNSUP, b"option not supported"))
        return False

    # ---- transmission -----------------------------------------------------------------------

    async def _transmission(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: Set[asyncio.Task] = set()
        try:
            while True:
                self.reading = True
                if self.server._closing:
                    break
                req = await self._next_request()
                self.reading = False
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
            self.reading = False
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
                parts = await loop.run_in_executor(self.server._pool, self._execute, req, payload)
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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Server:
    """An NBD export of one image, listening from the moment ``serve()`` returns.

    ``uri`` is what clients connect to ("nbd+unix:///NAME?socket=PATH" or
    "nbd://HOST:PORT/NAME"; "nbds..." with TLS). ``job`` is the pull running (or last
    run) on the served image. ``close()`` stops accepting, lets the requests in flight
    finish, flushes, aborts a running pull cleanly (the image stays valid and backed, a
    later pull resumes) and closes the image. A context manager, sync or async;
    ``await server.wait_closed()`` waits until it is closed.
    """

    def __init__(self, image: Any, export_name: str, socket_path: Optional[str],
                 host: Optional[str], port: Optional[int],
                 tls: Optional[Sequence[str]]) -> None:
        self.image = image
        self.export_name = export_name
        self.control: Any = None        # the QMP ControlServer, with serve(control=...)
        self._export = Export(image, export_name)
        self._ssl = _tls_context(tls) if tls else None
        self._closing = False
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._conns: Set[_Connection] = set()
        self._conn_tasks: Set[asyncio.Task] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(WORKERS, "blockpull-nbd")
        self._tmpdir: Optional[str] = None
        self.socket_path: Optional[str] = None
        self.host: Optional[str] = None
        self.port: Optional[int] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="blockpull-nbd")
        self._thread.start()
        try:
            fut = asyncio.run_coroutine_threadsafe(self._listen(socket_path, host, port),
                                                   self._loop)
            try:
                self._aserver = fut.result()
            except OSError as exc:
                where = socket_path if host is None and port is None else \
                    f"{host or '127.0.0.1'}:{port or 0}"
                raise ServeError(f"cannot listen on {where}: {exc.strerror or exc}; choose "
                                 f"another address, port or socket path") from exc
        except BaseException:
            self._stop_loop()
            self._pool.shutdown(wait=False)
            self._cleanup_socket()
            raise

    # ---- listening ---------------------------------------------------------------------

    async def _listen(self, socket_path: Optional[str], host: Optional[str],
                      port: Optional[int]):
        if host is not None or port is not None:
            self.host = host or "127.0.0.1"
            srv = await asyncio.start_server(self._client, self.host, port or 0,
                                             limit=1 << 20, reuse_address=True)
            self.port = srv.sockets[0].getsockname()[1]
            for s in srv.sockets:
                s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            return srv
        if socket_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="blockpull-nbd-")
            socket_path = os.path.join(self._tmpdir, "nbd.sock")
        socket_path = os.path.abspath(socket_path)
        if len(os.fsencode(socket_path)) > 107:
            raise ServeError(f"{socket_path}: longer than the 107 bytes a Unix socket path "
                             f"may have; choose a shorter path")
        if os.path.lexists(socket_path):
            raise ServeError(f"{socket_path}: already exists; remove it or choose another "
                             f"socket path")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(socket_path)
            bound = True
            os.chmod(socket_path, 0o600)     # before listen(): nobody else can connect
            srv = await asyncio.start_unix_server(self._client, sock=sock, limit=1 << 20)
        except BaseException:
            sock.close()
            if bound:
                os.unlink(socket_path)
            raise
        self.socket_path = socket_path
        return srv

    @property
    def uri(self) -> str:
        """The NBD URI of the export (nbd URI spec, NetworkBlockDevice/nbd doc/uri.md)."""
        scheme = "nbds" if self._ssl else "nbd"
        name = quote(self.export_name, safe="")
        if self.socket_path is not None:
            return f"{scheme}+unix:///{name}?socket={quote(self.socket_path, safe='/')}"
        host = self.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/{name}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or len(self._conns) >= MAX_CONNECTIONS:
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (_socket.AF_INET, _socket.AF_INET6):
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        conn = _Connection(self, reader, writer)
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            await conn.run()
        finally:
            self._conns.discard(conn)
            if task is not None:
                self._conn_tasks.discard(task)

    # ---- the pull ---------------------------------------------------------------------------

    @property
    def job(self):
        """The PullJob of the served image (running or last run), or None."""
        return self.image.job

    def pull(self, base: Optional[str] = None, bandwidth: Union[int, str] = 0,
             on_error: str = "report", on_event: Optional[Callable[[Any], None]] = None):
        """Start pulling the served image's backing chain (down to ``base``) while it is
        served; returns the running PullJob (``Image.pull``). Raises JobActiveError if a
        pull runs already, ServeError on a read-only or closed server."""
        if self.control is not None:     # a QMP socket sees it as the job "top"
            return self.control.start(base=base, bandwidth=bandwidth, on_error=on_error,
                                      on_event=on_event)
        return self._start_pull(base=base, bandwidth=bandwidth, on_error=on_error,
                                on_event=on_event)

    def _start_pull(self, base: Optional[str] = None, bandwidth: Union[int, str] = 0,
                    on_error: str = "report", on_event: Optional[Callable[[Any], None]] = None):
        if self._closing:
            raise ServeError("the server is closed; serve the image again to pull it")
        if self._export.readonly:
            raise ServeError("the export is read-only: serve the image read-write to pull it")
        return self.image.pull(base=base, bandwidth=bandwidth, on_error=on_error,
                               on_event=on_event, chunk=PULL_CHUNK)

    # ---- closing ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def connections(self) -> int:
        """Clients connected now."""
        return len(self._conns)

    async def _shutdown(self, timeout: Optional[float]) -> None:
        self._aserver.close()
        # stop reading new requests where a connection waits for one; requests in flight
        # finish and are answered first
        for t in list(self._conn_tasks):
            t.cancel()
        if self._conn_tasks:
            _done, pending = await asyncio.wait(
                list(self._conn_tasks), timeout=CLOSE_GRACE if timeout is None else timeout)
            if pending:
                # clients that do not take their replies: drop their connections (what
                # their requests did to the image stays; only the replies are lost)
                for conn in list(self._conns):
                    conn.writer.transport.abort()
                await asyncio.wait(pending, timeout=5)
        try:
            await asyncio.wait_for(self._aserver.wait_closed(), 1)
        except BaseException:
            pass

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop accepting, finish the requests in flight and send their replies (waiting
        at most ``timeout`` seconds, ``CLOSE_GRACE`` if None, for clients to take them;
        then their connections are dropped), flush, abort a running pull cleanly (the
        image stays valid and backed) and close the image."""
        with self._close_lock:
            if self._closed.is_set():
                return
            self._closing = True
            if self.control is not None:
                self.control.close()
            try:
                if self._loop.is_running():
                    fut = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self._loop)
                    try:
                        fut.result()
                    except Exception:
                        log.exception("NBD server shutdown")
                self._pool.shutdown(wait=True)
                job = self.image.job
                try:
                    if not self.image.readonly:
                        self.image.flush()
                finally:
                    if job is not None and not job.done():
                        job.abort(wait=True)
                    self.image.close()
            finally:
                self._stop_loop()
                self._cleanup_socket()
                self._closed.set()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()

    def _cleanup_socket(self) -> None:
        if self.socket_path is not None:
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the server is closed; False if ``timeout`` seconds passed first."""
        return self._closed.wait(timeout)

    async def wait_closed(self) -> None:
        """Wait (asyncio) until the server is closed."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._closed.wait)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __repr__(self) -> str:
        return f"<blockpull.nbd.Server {self.uri} {'closed' if self.closed else 'serving'}>"


def _tls_context(tls: Sequence[str]) -> ssl.SSLContext:
    if sys.version_info < (3, 11):
        raise ServeError("TLS needs Python 3.11 or later (asyncio start_tls on a stream)")
    if not 2 <= len(tls) <= 3:
        raise ServeError("tls must be (certfile, keyfile) or (certfile, keyfile, cafile)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls[0], tls[1])
        if len(tls) == 3 and tls[2]:
            ctx.load_verify_locations(tls[2])
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ServeError(f"cannot load the TLS certificate or key: {exc}; give PEM files "
                         f"(certfile, keyfile[, cafile])") from exc
    return ctx


def serve(path: Union[str, "os.PathLike[str]"], *, socket: Optional[str] = None,
          host: Optional[str] = None, port: Optional[int] = None, export_name: str = "",
          readonly: bool = False, copy_on_read: bool = True,
          backing_format: Any = None, tls: Optional[Sequence[str]] = None,
          pull: bool = False, base: Optional[str] = None, bandwidth: Union[int, str] = 0,
          on_error: str = "report", on_event: Optional[Callable[[Any], None]] = None,
          control: Optional[str] = None) -> Server:
    """Serve the image at ``path`` over NBD; returns a listening ``Server``.

    By default on a new Unix socket (0600, in a private 0700 directory); ``socket`` names
    the path instead; ``host``/``port`` listen on TCP (127.0.0.1 unless ``host`` is given;
    port 0 picks a free one). A non-loopback address requires ``tls`` = (certfile,
    keyfile[, cafile]) (PEM; a cafile makes client certificates required). The image is
    opened (and locked) as a writer unless ``readonly``; reads of inherited data copy on
    read unless ``copy_on_read=False``. ``pull=True`` starts ``server.pull(base,
    bandwidth, on_error, on_event)`` at once. ``control`` is the path of a QMP socket
    (0600) steering the served image's pulls as QEMU's block jobs on the node ``top``
    (``blockpull.qmp``); ``quit`` there closes the server.

    Raises ServeError for bad serving options, and what ``blockpull.open`` raises
    (ImageFormatError, BackingChainError, ImageLockedError, FileNotFoundError).
    """
    from blockpull.image import open as _open
    if pull and readonly:
        raise ServeError("pull=True writes into the image: serve it read-write (drop "
                         "readonly=True)")
    if socket is not None and (host is not None or port is not None):
        raise ServeError("give either socket= or host=/port=, not both")
    if host is not None and not _is_loopback(host) and not tls:
        raise ServeError(f"serving on {host} (not loopback) needs TLS: give "
                         f"tls=(certfile, keyfile[, cafile])")
    if port is not None and not 0 <= int(port) <= 65535:
        raise ServeError(f"port {port} is not a TCP port (0-65535)")
    if not isinstance(export_name, str) or len(export_name.encode()) > P.MAX_STRING \
            or "\0" in export_name:
        raise ServeError("export_name must be a string of at most 4096 bytes without NUL")
    image = _open(path, readonly=readonly, copy_on_read=copy_on_read and not readonly,
                  backing_format=backing_format)
    try:
        server = Server(image, export_name, socket, host, port, tls)
    except BaseException:
        image.close()
        raise
    if control is not None:
        from blockpull.qmp import ControlServer
        try:
            server.control = ControlServer(control, image, server._start_pull,
                                           on_quit=server.close)
        except BaseException:
            server.close()
            raise
    if pull:
        try:
            server.pull(base=base, bandwidth=bandwidth, on_error=on_error, on_event=on_event)
        except BaseException:
            server.close()
            raise
    log.info("serving %s at %s", image.path, server.uri)
    return server
