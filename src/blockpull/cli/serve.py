"""``blockpull serve``: serve an image over NBD, optionally pulling it meanwhile.

The URI goes first on stdout (a JSON object with ``--output json``), then the pull's
progress (a bar on stderr on a terminal, JSON lines with ``--output json``). SIGINT and
SIGTERM shut the server down as ``Server.close()`` does (requests in flight finish, a
running pull is aborted cleanly: the image stays valid and backed) and exit 0.
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import threading
from typing import Any, Optional, Tuple

import blockpull
from blockpull.cli.common import (EXIT_OK, PROG, UsageError, add_allow_data_file, add_output,
                                  add_progress, bandwidth_arg, want_bar)
from blockpull.cli.output import Progress, emit_json
from blockpull.units import format_size

__all__ = ["add_parser", "cmd_serve"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``serve`` to the subcommands ``sub``."""
    p = sub.add_parser(
        "serve", parents=[common], help="serve the image over NBD (and pull it meanwhile)",
        description="Serve PATH over NBD (a VM, qemu-img, nbdcopy... connect to the URI "
                    "printed first) while --pull copies its backing chain into it. "
                    "SIGINT/SIGTERM stop serving cleanly (a running pull is aborted, the "
                    "image stays valid and backed).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="S",
                       help="Unix socket path (default: a new 0600 socket in a private "
                            "temporary directory)")
    where.add_argument("--bind", metavar="ADDR",
                       help="listen on TCP at this address (non-loopback needs --tls-*)")
    p.add_argument("--port", type=int, metavar="P",
                   help="TCP port (default 10809 with --bind; 0 picks a free one)")
    p.add_argument("--export", default="", metavar="NAME", help="export name (default: empty)")
    p.add_argument("--readonly", action="store_true", help="refuse writes")
    p.add_argument("--no-copy-on-read", dest="copy_on_read", action="store_false",
                   help="reads of inherited data do not copy it into the image")
    p.add_argument("-F", "--backing-format", metavar="FMT",
                   help="format of backing files that do not record one")
    add_allow_data_file(p)
    p.add_argument("--pull", action="store_true",
                   help="pull the backing chain into the image while serving it")
    p.add_argument("--base", metavar="B", help="with --pull: keep this image as the backing")
    p.add_argument("--bandwidth", type=bandwidth_arg, default=0, metavar="RATE",
                   help="with --pull: limit in bytes/s, e.g. 50M (MiB/s); 0 = unlimited")
    p.add_argument("--on-error", choices=("report", "stop", "ignore"), default="report",
                   help="with --pull: what an I/O error does (as for `blockpull pull`)")
    p.add_argument("--tls-cert", metavar="F", help="server certificate (PEM): serve with TLS")
    p.add_argument("--tls-key", metavar="F", help="the certificate's private key (PEM)")
    p.add_argument("--tls-ca", metavar="F",
                   help="CA certificate (PEM): require client certificates signed by it")
    p.add_argument("--control", metavar="QMP_SOCKET",
                   help="also listen on this Unix socket (0600) for QMP: steer pulls as "
                        "QEMU's block jobs on the node 'top'; 'quit' stops serving")
    add_progress(p)
    add_output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_serve)


def _listen_options(args: argparse.Namespace) -> Tuple[Optional[str], Optional[int],
                                                      Optional[Tuple[str, ...]]]:
    """The host, port and TLS files ``blockpull.serve`` takes; raises UsageError for
    options that do not go together."""
    if args.pull and args.readonly:
        raise UsageError("--pull writes into the image: serve it read-write (drop --readonly)")
    if (args.base or args.bandwidth) and not args.pull:
        raise UsageError("--base and --bandwidth go with --pull")
    if args.port is not None and args.bind is None and args.socket is not None:
        raise UsageError("--port goes with --bind (TCP), not --socket")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_ca and not args.tls_cert):
        raise UsageError("TLS needs both --tls-cert and --tls-key (and --tls-ca optionally)")
    tls = None
    if args.tls_cert:
        tls = (args.tls_cert, args.tls_key) + ((args.tls_ca,) if args.tls_ca else ())
    host, port = args.bind, args.port
    if host is not None and port is None:
        port = 10809
    if host is None and port is not None:
        host = "127.0.0.1"
    return host, port, tls


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; exit 0 after a clean shutdown."""
    json_lines = args.output == "json"
    host, port, tls = _listen_options(args)
    stop = threading.Event()

    def on_signal(_sig: int, _frame: Any) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = blockpull.serve(args.path, socket=args.socket, host=host, port=port,
                                 export_name=args.export, readonly=args.readonly,
                                 copy_on_read=args.copy_on_read,
                                 backing_format=args.backing_format, tls=tls,
                                 control=args.control,
                                 allow_data_file=args.allow_data_file)
        try:
            if json_lines:
                emit_json({"type": "serving", "uri": server.uri, "path": server.image.path,
                           "readonly": args.readonly, "control": args.control}, sys.stdout)
            else:
                print(server.uri, flush=True)
            if args.pull and not stop.is_set():
                _follow_pull(server, args, json_lines, stop)
            while not stop.wait(0.5) and not server.closed:   # QMP quit closes it
                pass
        finally:
            job = server.job
            running = job is not None and not job.done()
            server.close()
        if running and job is not None:
            info = job.info()
            msg = (f"{PROG}: serving stopped; the pull was aborted at "
                   f"{format_size(info.cur)} of {format_size(info.end)}: the image is valid "
                   f"and still backed; serve it with --pull again to resume")
            if json_lines:
                emit_json({"type": "event", "event": "cancelled", "cur": info.cur,
                           "end": info.end}, sys.stdout)
            print(msg, file=sys.stderr)
        if json_lines:
            emit_json({"type": "closed"}, sys.stdout)
        return EXIT_OK
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _follow_pull(server: Any, args: argparse.Namespace, json_lines: bool,
                 stop: threading.Event) -> None:
    """Start the pull and show its progress until it ends or a signal arrives."""
    events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
    progress = Progress(want_bar(args, json_lines), json_lines,
                        os.path.basename(server.image.path))
    job = server.pull(base=args.base, bandwidth=args.bandwidth, on_error=args.on_error,
                      on_event=events.put)
    progress.start(job.info())
    while not stop.is_set() and not job.wait(progress.interval):
        progress.drain(events)
        progress.update(job.info())
    if not job.done():
        return          # a signal: close() aborts the pull and says so
    backing = server.image.backing_name
    progress.finish(job.info(), job.status, job.error, backing)
    if job.status == "completed":
        now = f"now backed by {backing}" if backing else "it stands alone now"
        if not json_lines:
            print(f"{PROG}: pull of {server.image.path} completed; {now}; still serving "
                  f"(Ctrl-C to stop)", file=sys.stderr, flush=True)
    else:
        print(f"{PROG}: pull {job.status}: {job.error}; still serving (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
