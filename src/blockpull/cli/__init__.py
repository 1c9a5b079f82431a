"""The ``blockpull`` command line: create, info, map, pull, check, demo and serve.

Every command that reports takes ``--output human|json``. Exit codes: 0 success, 1 the
operation failed, 2 bad usage or bad input, 130 interrupted (Ctrl-C); ``check`` follows
``qemu-img check`` (0 clean, 2 corrupt, 3 leaks only). An error is one line on stderr,
``blockpull: error: ...``; ``--debug`` adds the traceback.

Layout: ``main`` builds the parser and turns any error into that line and an exit code;
``common`` holds what commands share (exit codes, ``UsageError``/``OperationFailed``, the
error mapping, option groups, opening PATH); ``output`` how things are shown (JSON lines,
tables, the pull's progress bar); one module per command (``create``, ``info``, ``map``,
``pull``, ``check``, ``demo`` with the demo's data generator, ``serve``) and ``vmdemo``
(``demo --serve``).

A new command is one new module here with ``add_parser(sub, common)`` (its sub-parser,
``set_defaults(func=cmd_NAME)``) and ``cmd_NAME(args) -> exit code``, plus one line: the
module in ``COMMANDS`` of ``main``. A command raises ``UsageError`` (exit 2) or
``OperationFailed`` (exit 1), or lets a ``BlockpullError``/``OSError`` through; ``main``
prints the one line.
"""
from blockpull.cli.common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,
                                  OperationFailed, UsageError)
from blockpull.cli.main import build_parser, main

__all__ = ["main", "build_parser", "UsageError", "OperationFailed", "EXIT_OK", "EXIT_FAILED",
           "EXIT_USAGE", "EXIT_INTERRUPTED"]
