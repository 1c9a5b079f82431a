"""Type stubs for the compiled module blockpull._q2map."""
from typing import Any

from typing_extensions import disjoint_base

from blockpull._fileio import File
from blockpull._q2refcount import Refcounts


@disjoint_base
class ClusterMap:
    def __init__(self, f: File, rc: Refcounts, h: Any, l2_cache_bytes: int) -> None: ...
