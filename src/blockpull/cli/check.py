"""``blockpull check``: metadata consistency, with ``qemu-img check``'s output and exit
codes (0 clean, 1 check incomplete, 2 corrupt, 3 leaks only)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

import blockpull
from blockpull.cli.common import (OperationFailed, UsageError, add_output, describe,
                                  suggest_force_share)
from blockpull.errors import BlockpullError

__all__ = ["add_parser", "cmd_check", "check_summary"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``check`` to the subcommands ``sub``."""
    p = sub.add_parser("check", parents=[common], help="check an image's metadata",
                       description="Check the image's metadata for consistency, as "
                                   "`qemu-img check` does. Exit codes: 0 clean, 1 check "
                                   "incomplete, 2 corrupt, 3 leaks only.")
    p.add_argument("-f", "--format", dest="fmt", metavar="FMT", help="format (probed if omitted)")
    p.add_argument("-r", "--repair", choices=("leaks",),
                   help="repair leaked clusters (corruptions are only reported)")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="check an image another process (a VM) has open for writing; "
                        "what it finds may be changing (not with -r)")
    add_output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_check)


def check_summary(res: "blockpull.CheckResult") -> str:
    """What ``qemu-img check`` prints on stdout for this result, byte for byte: after a
    repair, what was repaired and the result of checking the image again; the counts;
    the allocation line (when anything is allocated) with fragmentation; the image end
    offset (QED has none)."""
    out = []
    if res.leaks_fixed:
        out.append(f"The following inconsistencies were found and repaired:\n\n"
                   f"    {res.leaks_fixed} leaked clusters\n    0 corruptions\n\n"
                   f"Double checking the fixed image now...\n")
    if not (res.corruptions or res.leaks or res.check_errors):
        out.append("No errors were found on the image.\n")
    if res.corruptions:
        out.append(f"\n{res.corruptions} errors were found on the image.\n"
                   f"Data may be corrupted, or further writes to the image may corrupt it.\n")
    if res.leaks:
        out.append(f"\n{res.leaks} leaked clusters were found on the image.\n"
                   f"This means waste of disk space, but no harm to data.\n")
    if res.check_errors:
        out.append(f"\n{res.check_errors} internal errors have occurred during the check.\n")
    total, allocated = res.total_clusters, res.allocated_clusters
    if total and allocated:
        out.append(f"{allocated}/{total} = {100.0 * allocated / total:.2f}% allocated, "
                   f"{100.0 * res.fragmented_clusters / allocated:.2f}% fragmented, "
                   f"{100.0 * res.compressed_clusters / allocated:.2f}% compressed clusters\n")
    if res.image_end_offset and res.format != "qed":
        out.append(f"Image end offset: {res.image_end_offset}\n")
    return "".join(out)


def cmd_check(args: argparse.Namespace) -> int:
    """``blockpull check``: metadata consistency, with qemu-img check's exit codes; one
    line per finding, then qemu-img check's summary byte for byte."""
    if args.repair and args.force_share:
        raise UsageError("-U cannot be used with -r: a repair writes to the image")
    opening = contextlib.nullcontext() if args.repair else suggest_force_share()
    try:
        with opening:
            res = blockpull.check(args.path, repair=bool(args.repair), format=args.fmt,
                                  force_share=args.force_share)
    except (BlockpullError, OSError) as exc:
        # exit 2 means "corrupt" for check: an image that could not be checked (missing,
        # not an image, a feature not supported here) is exit 1, "check incomplete"
        _code, msg = describe(exc)
        raise OperationFailed(f"{msg} (check incomplete: nothing was checked or repaired)") \
            from exc
    if args.output == "json":
        print(json.dumps(res.to_json(), indent=4))
        return res.exit_code
    for m in res.messages:
        print(m)
    sys.stdout.write(check_summary(res))
    return res.exit_code
