"""``blockpull map``: the allocation map, in the shapes ``qemu-img map`` prints."""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Iterator, List, Optional, Sequence

from blockpull.cli.common import EXIT_OK, OperationFailed, add_opener, add_output, open_image
from blockpull.image import Extent
from blockpull.paths import local_name

__all__ = ["add_parser", "cmd_map", "format_map_json", "chain_names", "format_map_human"]

#: "proto:" at the start of a backing name: QEMU opens such a name as it stands
_PROTOCOL = re.compile(r"^[A-Za-z0-9.+-]+:")


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


def chain_names(top: str, backing_names: Sequence[Optional[str]]) -> List[str]:
    """The name ``qemu-img map`` gives each image of a chain: the top as the user named
    it, and each backing file as its parent records it, joined to the directory part of
    the parent's name when relative (QEMU's util/cutils.c path_combine), or as it stands
    for a "file:" or ``json:`` name (its local file name). ``backing_names[i]`` is what
    image ``i`` records (None for the bottom)."""
    names = [top]
    for name in backing_names[:-1]:
        parent = names[-1]
        if name is None:
            break
        if _PROTOCOL.match(name):
            names.append(local_name(name) or name)
        elif os.path.isabs(name) or "/" not in parent:
            names.append(name)
        else:
            names.append(parent[:parent.rindex("/") + 1] + name)
    return names


def _hex(v: int) -> str:
    """``v`` as C's "%#x" prints it (0 without "0x")."""
    return f"{v:#x}" if v else "0"


def format_map_human(extents: Sequence[Extent], names: Sequence[str]) -> Iterator[str]:
    """The lines `qemu-img map` prints, one by one: a header, then each extent the chain
    holds as data (not known to read as zeros) with its host offset and the name of its
    image (``names[depth]``). Raises OperationFailed on reaching a compressed extent,
    which has no host offset of its own to print (qemu-img stops there too)."""
    yield f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"
    for e in extents:
        if not e.data or e.zero:
            continue
        if e.offset is None:
            raise OperationFailed(f"{names[0]}: the human map cannot show compressed "
                                  f"clusters, which have no host offset of their own: "
                                  f"use --output json")
        yield f"{_hex(e.start):<16}{_hex(e.length):<16}{_hex(e.offset):<16}{names[e.depth]}"


def cmd_map(args: argparse.Namespace) -> int:
    """``blockpull map``: the allocation map, in qemu-img map's shapes."""
    with open_image(args, readonly=True) as img:
        extents = img.map()
        names = chain_names(os.fspath(args.path), [d.backing_name for d in img.layers])
        # data of an image with an external data file lies there, as qemu-img map says
        names = [d.data_file.path if d.data_file is not None else name
                 for d, name in zip(img.layers, names)]
    if args.output == "json":
        print(format_map_json(extents))
        return EXIT_OK
    for line in format_map_human(extents, names):
        print(line, flush=True)
    return EXIT_OK
