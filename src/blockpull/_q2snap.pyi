"""Type stubs for the compiled module blockpull._q2snap."""
from typing import Any, List

from typing_extensions import disjoint_base

from blockpull._fileio import File
from blockpull._q2map import ClusterMap


@disjoint_base
class Snapshots:
    def __init__(self, f: File, cmap: ClusterMap, table: List[Any]) -> None: ...
    def __len__(self) -> int: ...
