"""``blockpull create``: a new empty image or overlay."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, Sequence

import blockpull
from blockpull.cli.common import EXIT_OK, UsageError, add_output, size_arg
from blockpull.cli.output import emit_json
from blockpull.paths import kernel_abspath
from blockpull.units import format_size, parse_size

__all__ = ["add_parser", "cmd_create", "parse_create_options"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``create`` to the subcommands ``sub``."""
    p = sub.add_parser("create", parents=[common], help="create an empty image or an overlay",
                       description="Create a qcow2 or QED image, empty or backed by another.")
    p.add_argument("-f", "--format", dest="fmt", default="qcow2", metavar="FMT",
                   help="qcow2 (default) or qed")
    p.add_argument("-b", "--backing", metavar="BACKING",
                   help="backing file, recorded as given (relative names resolve against "
                        "the new image's directory)")
    p.add_argument("-F", "--backing-format", metavar="FMT",
                   help="format of the backing file (qcow2, qed or raw); probed and "
                        "recorded when omitted, except raw, which must be named")
    p.add_argument("-o", "--options", action="append", default=[], metavar="OPTS",
                   help="cluster_size=N (512 to 2M), compat=1.1|0.10 (qcow2 v3 or v2)")
    add_output(p)
    p.add_argument("path", metavar="PATH")
    p.add_argument("size", metavar="SIZE", nargs="?", type=size_arg,
                   help="virtual size, e.g. 10G (defaults to the backing file's)")
    p.set_defaults(func=cmd_create)


def parse_create_options(items: Sequence[str]) -> Dict[str, Any]:
    """``-o cluster_size=64K,compat=1.1`` (repeatable) as create() keyword arguments
    (cluster_size in bytes, compat "1.1" or "0.10"); raises UsageError."""
    out: Dict[str, Any] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not value.strip():
                raise UsageError(f"-o {part!r}: expected NAME=VALUE (cluster_size=64K,compat=1.1)")
            value = value.strip()
            if key == "cluster_size":
                try:
                    out["cluster_size"] = parse_size(value)
                except ValueError as exc:
                    raise UsageError(f"-o cluster_size: {exc}") from None
            elif key == "compat":
                if value in ("v3", "1.1"):
                    value = "1.1"
                elif value in ("v2", "0.10"):
                    value = "0.10"
                else:
                    raise UsageError(f"-o compat={value}: use 1.1 (qcow2 v3) or 0.10 (qcow2 v2)")
                out["compat"] = value
            else:
                raise UsageError(f"-o {key}: unknown option (known: cluster_size, compat)")
    return out


def _header_report(path: str, fmt: str) -> Dict[str, Any]:
    """What the new image's header says, read alone (the backing file may be in use)."""
    from blockpull.formats import open_driver
    drv = open_driver(path, fmt, False, "top")
    try:
        return {"path": kernel_abspath(path), "format": drv.format,
                "virtual_size": drv.size, "cluster_size": drv.cluster_size,
                "backing": drv.backing_name, "backing_format": drv.backing_format}
    finally:
        drv.close()


def cmd_create(args: argparse.Namespace) -> int:
    """``blockpull create``: a new empty image or overlay."""
    if args.backing_format and not args.backing:
        raise UsageError("-F/--backing-format needs -b/--backing")
    opts = parse_create_options(args.options)
    size = args.size
    if size is None:
        if not args.backing:
            raise UsageError("SIZE is required without a backing file (e.g. 10G)")
        size = 0
    elif size == 0:
        raise UsageError("SIZE must be positive (omit it to take the backing file's size)")
    blockpull.create(args.path, size, fmt=args.fmt, backing=args.backing,
                     backing_format=args.backing_format, **opts)
    report = _header_report(args.path, args.fmt)
    if args.output == "json":
        emit_json(report, sys.stdout)
    else:
        line = (f"created {args.path}: {report['format']}, {format_size(report['virtual_size'])} "
                f"({report['virtual_size']} bytes), cluster size {format_size(report['cluster_size'])}")
        if report["backing"] and report["backing_format"]:
            line += f", backed by {report['backing']} ({report['backing_format']})"
        elif report["backing"]:
            line += (f", backed by {report['backing']} ({report['format']} records no format "
                     f"for it: its qcow2 or QED header tells it when the image is opened)")
        print(line)
    return EXIT_OK
