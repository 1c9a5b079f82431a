"""Type stubs for the compiled module blockpull._q2compress."""
from typing import Any

from typing_extensions import disjoint_base


def zstd_frame_len(b: Any, pos: int) -> int: ...


@disjoint_base
class Decompressor:
    cluster_size: int
    compression_type: int
    def __init__(self, cluster_size: int, compression_type: int, path: Any) -> None: ...
    def decompress(self, comp: bytes, c: int) -> bytes: ...
