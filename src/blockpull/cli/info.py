"""``blockpull info``: the chain with formats and sizes, and an allocation summary."""
from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import Any, Dict, List, NamedTuple, Sequence

from blockpull.cli.common import EXIT_OK, add_opener, add_output, open_image
from blockpull.cli.output import emit_json, table
from blockpull.image import Extent
from blockpull.units import format_size

__all__ = ["add_parser", "cmd_info", "Allocation", "allocation"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``info`` to the subcommands ``sub``."""
    p = sub.add_parser("info", parents=[common], help="show the chain and what is allocated",
                       description="Show the backing chain (formats, sizes) and a summary "
                                   "of what is allocated where.")
    add_opener(p, True)
    add_output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_info)


class Allocation(NamedTuple):
    """How the virtual disk is provided, in bytes: data by chain depth, zero clusters,
    and unallocated ranges (which read as zeros)."""
    data_by_depth: List[int]
    zero: int
    unallocated: int

    @property
    def data_in_top(self) -> int:
        """Data the top image holds itself."""
        return self.data_by_depth[0]

    @property
    def data_in_backing(self) -> int:
        """Data read from the backing chain: what a whole pull copies."""
        return sum(self.data_by_depth[1:])


def allocation(extents: Sequence[Extent], depth: int) -> Allocation:
    """Summarise a map of a chain ``depth`` images deep."""
    data = [0] * depth
    zero = unalloc = 0
    for e in extents:
        if e.data:
            data[e.depth] += e.length
        elif e.present:
            zero += e.length
        else:
            unalloc += e.length
    return Allocation(data, zero, unalloc)


def _disk_usage(path: str) -> int:
    """Bytes the image takes on its storage: the blocks allocated to a file, the whole
    size of a block device (whose st_blocks is 0; it takes all of itself)."""
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        return st.st_blocks * 512
    except OSError:
        return 0


def _report(args: argparse.Namespace) -> Dict[str, Any]:
    """What ``info --output json`` prints: the top, its chain, the allocation summary."""
    with open_image(args, readonly=True) as img:
        chain = img.chain
        data_files = [d.data_file.path if d.data_file is not None else None
                      for d in img.layers]
        alloc = allocation(img.map(), len(chain))
        return {
            "path": img.path, "format": img.format, "virtual_size": img.size,
            "cluster_size": img.cluster_size, "backing": img.backing_name,
            "chain": [{"path": c.path, "format": c.format, "virtual_size": c.size,
                       "disk_size": _disk_usage(c.path), "data_bytes": alloc.data_by_depth[i],
                       "data_file": data_files[i]}
                      for i, c in enumerate(chain)],
            "allocation": {"data_in_top": alloc.data_in_top,
                           "data_in_backing": alloc.data_in_backing,
                           "zero": alloc.zero, "unallocated": alloc.unallocated},
        }


def _human(report: Dict[str, Any]) -> str:
    """The report as text: the top, a table of the chain, the allocation summary."""
    size = report["virtual_size"]
    lines = [f"image:        {report['path']}",
             f"format:       {report['format']}, cluster size {format_size(report['cluster_size'])}",
             f"virtual size: {format_size(size)} ({size} bytes)",
             "backing:      " + (report["backing"] or "none")]
    for i, c in enumerate(report["chain"]):
        if c["data_file"]:
            lines.append(f"data file:    [{i}] {c['data_file']} (holds the data of [{i}])")
    lines.append("chain, top first:")
    rows = [("", "path", "format", "virtual size", "on disk", "data read from it")]
    for i, c in enumerate(report["chain"]):
        rows.append((f"[{i}]", c["path"], c["format"], format_size(c["virtual_size"]),
                     format_size(c["disk_size"]), format_size(c["data_bytes"])))
    lines += table(rows, indent=2)

    def pct(n: int) -> str:
        return f"{100.0 * n / size:5.1f}%" if size else "  0.0%"
    a = report["allocation"]
    lines.append("allocation of the virtual disk:")
    for label, n in (("data in the top image", a["data_in_top"]),
                     ("data from the backing chain", a["data_in_backing"]),
                     ("zero clusters", a["zero"]),
                     ("unallocated (reads as zeros)", a["unallocated"])):
        lines.append(f"  {label:<29} {format_size(n):>10}  {pct(n)}")
    if len(report["chain"]) > 1:
        lines.append(f"a pull copies about {format_size(a['data_in_backing'])} into the top image")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    """``blockpull info``: the chain with formats and sizes, and an allocation summary."""
    report = _report(args)
    if args.output == "json":
        emit_json(report, sys.stdout)
    else:
        print(_human(report))
    return EXIT_OK
