"""The NBD server's lifecycle: the listening socket (Unix or TCP, TLS), the asyncio loop
and worker threads, the pull of the served image, and shutdown; ``serve()``.

An asyncio loop on its own thread accepts connections; each one speaks the protocol in
``blockpull.nbd.connection`` (handshake, pipelined requests, bounded memory) and its
requests run on a small pool of worker threads against the one Image
(``blockpull.nbd.export``). At most ``MAX_CONNECTIONS`` clients are served at once.
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
from typing import Any, Callable, Optional, Sequence, Set, Union
from urllib.parse import quote

from blockpull.budget import Budget
from blockpull.errors import ServeError
from blockpull.nbd import protocol as P
from blockpull.nbd.connection import (MAX_BYTES_IN_FLIGHT, MAX_IN_FLIGHT, MAX_OPTION,
                                      Connection)
from blockpull.nbd.export import Export

log = logging.getLogger("blockpull")

# the per-connection limits are the connection module's, named here too
__all__ = ["Server", "serve", "MAX_IN_FLIGHT", "MAX_BYTES_IN_FLIGHT", "MAX_OPTION",
           "MAX_CONNECTIONS"]

#: connections served at once; more are closed at once
MAX_CONNECTIONS = 256
#: bytes a served pull copies per step: the copy loop reads each step from the chain
#: under the image lock, so clients wait at most that long; 1 MiB copies as fast as the
#: default 8 MiB here and cuts those waits eightfold
PULL_CHUNK = 1 << 20
#: seconds close() waits for clients to take the replies of their requests in flight
CLOSE_GRACE = 30.0
#: worker threads carrying out requests
WORKERS = 4


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
        self.budget: Any = None         # the Budget every pull of the image draws on, or None
        self._export = Export(image, export_name)
        self._ssl = _tls_context(tls) if tls else None
        self._closing = False
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._conns: Set[Connection] = set()
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
        conn = Connection(self._export, self._ssl, self._pool, lambda: self._closing,
                          reader, writer)
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
                               on_event=on_event, chunk=PULL_CHUNK, budget=self.budget)

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
                    conn.abort()
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
          control: Optional[str] = None, budget: Any = None,
          allow_data_file: bool = False) -> Server:
    """Serve the image at ``path`` over NBD; returns a listening ``Server``.

    By default on a new Unix socket (0600, in a private 0700 directory); ``socket`` names
    the path instead; ``host``/``port`` listen on TCP (127.0.0.1 unless ``host`` is given;
    port 0 picks a free one). A non-loopback address requires ``tls`` = (certfile,
    keyfile[, cafile]) (PEM; a cafile makes client certificates required). The image is
    opened (and locked) as a writer unless ``readonly``; reads of inherited data copy on
    read unless ``copy_on_read=False``. ``pull=True`` starts ``server.pull(base,
    bandwidth, on_error, on_event)`` at once. ``control`` is the path of a QMP socket
    (0600) steering the served image's pulls as QEMU's block jobs on the node ``top``
    (``blockpull.qmp``); ``quit`` there closes the server. ``budget`` (a
    ``blockpull.Budget``): every pull of the served image, QMP's too, draws on it as well
    as on its own ``bandwidth``, so many served images can share one bandwidth.
    ``allow_data_file``: follow external data files that backing images name (see
    ``blockpull.open``).

    Raises ServeError for bad serving options (a ``budget`` that is not a Budget too), and
    what ``blockpull.open`` raises
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
    if budget is not None and not isinstance(budget, Budget):
        raise ServeError(f"budget= takes a blockpull.Budget shared by pulls, not {budget!r}; "
                         f"for the pull's own limit give bandwidth=")
    image = _open(path, readonly=readonly, copy_on_read=copy_on_read and not readonly,
                  backing_format=backing_format, allow_data_file=allow_data_file)
    try:
        server = Server(image, export_name, socket, host, port, tls)
        server.budget = budget
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
