"""``blockpull map``: the allocation map, in the shapes ``qemu-img map`` prints."""
from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from blockpull.cli.common import EXIT_OK, add_opener, add_output, open_image
from blockpull.image import Extent

__all__ = ["add_parser", "cmd_map", "format_map_json"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``map`` to the subcommands ``sub``."""
    p = sub.add_parser("map", parents=[common], help="show the allocation map",
                       description="Show the allocation map; --output json prints what "
                                   "`qemu-img map --output=json` prints.")
    add_opener(p, True)
    add_output(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_map)


def format_map_json(extents: Sequence[Extent]) -> str:
    """The text `qemu-img map --output=json` prints for these extents (one per line)."""
    items = []
    for e in extents:
        fields = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in e.to_json().items())
        items.append("{ " + fields + "}")
    return "[" + ",\n".join(items) + "]"


def cmd_map(args: argparse.Namespace) -> int:
    """``blockpull map``: the allocation map, in qemu-img map's shapes."""
    with open_image(args, readonly=True) as img:
        extents = img.map()
        # data of an image with an external data file lies there, as qemu-img map says
        paths = [d.data_file.path if d.data_file is not None else c.path
                 for d, c in zip(img.layers, img.chain)]
    if args.output == "json":
        print(format_map_json(extents))
        return EXIT_OK
    print(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
    for e in extents:
        if e.data and e.offset is not None:
            print(f"{e.start:<#16x}{e.length:<#16x}{e.offset:<#16x}{paths[e.depth]}"
                  .replace("0x0 ", "0   "))
    return EXIT_OK
