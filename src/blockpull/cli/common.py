"""What the commands share: exit codes, the two errors a command raises, the one mapping
of any error to an exit code and a message, argument types, the option groups several
commands take, and opening PATH."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator, NoReturn, Tuple

from blockpull.errors import BackingChainError, BlockpullError, ImageLockedError
from blockpull.image import Image
from blockpull.units import parse_bandwidth, parse_size

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "MiB", "PROG",
           "TERMINAL", "UsageError", "OperationFailed", "Parser", "describe", "size_arg",
           "bandwidth_arg", "count_arg", "add_output", "add_progress", "add_opener",
           "add_allow_data_file", "want_bar",
           "suggest_force_share", "open_image", "log"]

log = logging.getLogger("blockpull")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MiB = 1 << 20
PROG = "blockpull"

#: the kinds of PullEvent that end a job
TERMINAL = ("completed", "failed", "cancelled")


class UsageError(Exception):
    """Bad usage or bad input found by the command line itself: exit code 2."""


class OperationFailed(Exception):
    """The command ran and its operation failed (the message says why): exit code 1."""


# ---- errors as exit codes and one-line messages ------------------------------------------


_OS_TEXT = ((FileNotFoundError, "no such file or directory; check the path"),
            (FileExistsError, "already exists; remove it or choose another name"),
            (IsADirectoryError, "is a directory, not an image"),
            (NotADirectoryError, "a part of the path is not a directory"),
            (PermissionError, "permission denied; check the file's owner and mode"))


def describe(exc: BaseException) -> Tuple[int, str]:
    """The exit code and the message for an exception a command raised: 2 for bad usage
    or input, 1 for an operation that failed. ``main`` prints the message as one line."""
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OperationFailed):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, BackingChainError):
        return EXIT_USAGE, str(exc).replace("pass backing_format= to name it",
                                            "name it with -F/--backing-format")
    if isinstance(exc, BlockpullError):
        # not an image / malformed / unsupported (ImageFormatError), or no such image
        bad_input = isinstance(exc, (ValueError, FileNotFoundError))
        text = str(exc).replace("backing_format='raw' (-F raw on the command line)", "-F raw") \
            .replace("(format='raw'; -f raw on the command line)", "(-f raw)")\
            .replace("give tls=(certfile, keyfile[, cafile])", "give --tls-cert and --tls-key")
        return (EXIT_USAGE if bad_input else EXIT_FAILED), text
    if isinstance(exc, OSError):
        text = next((t for cls, t in _OS_TEXT if isinstance(exc, cls)), None) \
            or exc.strerror or str(exc)
        bad_input = isinstance(exc, tuple(cls for cls, _t in _OS_TEXT[:4]))
        name = exc.filename
        return (EXIT_USAGE if bad_input else EXIT_FAILED), (f"{name}: {text}" if name else text)
    if isinstance(exc, ValueError):
        return EXIT_USAGE, str(exc)
    return EXIT_FAILED, (f"unexpected {type(exc).__name__}: {exc} (run with --debug for the "
                         f"traceback, and please report it)")


# ---- arguments ----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``blockpull: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def size_arg(text: str) -> int:
    """A size argument ("10G", 1024-based suffixes) in bytes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bandwidth_arg(text: str) -> int:
    """A bandwidth argument ("50M" is 50 MiB/s) in bytes/s; 0 is unlimited."""
    try:
        return parse_bandwidth(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def count_arg(text: str) -> int:
    """A count argument (``--jobs``): a whole number of 1 or more."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return n


def add_output(p: argparse.ArgumentParser) -> None:
    """``--output human|json``."""
    p.add_argument("--output", choices=("human", "json"), default="human",
                   help="human-readable text (default) or JSON")


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress`` (default: a bar when stderr is a terminal)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="draw the progress bar on stderr even when it is not a terminal")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def add_opener(p: argparse.ArgumentParser, force_share: bool) -> None:
    """The format options of a command that opens PATH (and ``-U`` if ``force_share``)."""
    p.add_argument("-f", "--format", dest="fmt", metavar="FMT",
                   help="format of PATH (probed if omitted; raw must be named)")
    p.add_argument("-F", "--backing-format", metavar="FMT",
                   help="format of backing files that do not record one (under QED, "
                        "a qcow2 or QED backing is found by its magic)")
    add_allow_data_file(p)
    if force_share:
        p.add_argument("-U", "--force-share", action="store_true",
                       help="read an image another process (a VM) has open for writing; "
                            "what you see may be changing")


def add_allow_data_file(p: argparse.ArgumentParser) -> None:
    """``--allow-data-file``: follow the external data files backing images name."""
    p.add_argument("--allow-data-file", action="store_true",
                   help="follow an external data file named by a backing image (off by "
                        "default: a backing's header could name any file)")


def want_bar(args: argparse.Namespace, json_out: bool) -> bool:
    """Whether to draw the progress bar: as ``--progress``/``--no-progress`` say, else when
    the output is not JSON and stderr is a terminal."""
    if args.progress is not None:
        return bool(args.progress)
    return not json_out and sys.stderr.isatty()


# ---- opening images -----------------------------------------------------------------------


_FORCE_SHARE_HINT = "; to look at it anyway (what you see may be changing), add -U"


@contextlib.contextmanager
def suggest_force_share() -> Iterator[None]:
    """A read-only command refused by a lock says that -U reads the image anyway."""
    try:
        yield
    except ImageLockedError as exc:
        raise ImageLockedError(f"{exc}{_FORCE_SHARE_HINT}") from exc


def open_image(args: argparse.Namespace, readonly: bool) -> Image:
    """Open PATH with the format options every command shares; raises what
    ``blockpull.Image`` raises (a lock refusal names -U for a read-only command)."""
    force = getattr(args, "force_share", False)
    opening = suggest_force_share() if readonly else contextlib.nullcontext()
    with opening:
        return Image(args.path, readonly=readonly, format=getattr(args, "fmt", None),
                     backing_format=getattr(args, "backing_format", None),
                     force_share=force,
                     allow_data_file=getattr(args, "allow_data_file", False))
