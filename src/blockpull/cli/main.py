"""The ``blockpull`` parser and entry point: every command registers its sub-parser here
(``COMMANDS``), and every error a command raises becomes one line on stderr and an exit
code here (``main``)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Optional, Sequence

import blockpull
from blockpull.cli import check, create, demo, info, pull, serve, vmdemo
from blockpull.cli import map as map_
from blockpull.cli.common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, PROG, Parser,
                                  describe, log)

__all__ = ["main", "build_parser", "COMMANDS"]

#: the modules whose ``add_parser(sub, common)`` add a subcommand, in the order of
#: ``--help`` (``vmdemo`` adds ``--serve`` to ``demo``)
COMMANDS = (create, info, map_, pull, check, demo, vmdemo, serve)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``blockpull`` command and its subcommands."""
    common = Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log what blockpull does on stderr (-vv: debug detail)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show a traceback with errors")
    parser = Parser(
        prog=PROG,
        description="Pull a copy-on-write disk image (qcow2, QED) free of its backing chain "
                    "while it stays in use.",
        epilog="Exit codes: 0 success, 1 the operation failed, 2 bad usage or input, "
               "130 interrupted. Sizes take K, M, G, T suffixes (1024-based).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {blockpull.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log what blockpull does on stderr (-vv: debug detail)")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show a traceback with errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def _setup_logging(verbosity: int) -> None:
    if verbosity <= 0:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``blockpull`` command line with ``argv`` (default: ``sys.argv[1:]``);
    returns the exit code. An error is one line on stderr, ``blockpull: error: ...``
    (``--debug`` adds the traceback), with exit code 2 for bad usage or input, 1 for a
    failed operation, 130 for Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        _setup_logging(args.verbose)
        return int(args.func(args))
    except SystemExit as exc:        # --help, --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (| head): say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:
        code, msg = describe(exc)
        if debug:
            traceback.print_exc()
        msg = " ".join(str(msg).split()) or type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return code
