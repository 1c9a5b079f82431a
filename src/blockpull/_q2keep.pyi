"""Type stubs for the compiled module blockpull._q2keep."""
from typing import Any, Dict, List, Optional, Tuple

from typing_extensions import disjoint_base

from blockpull._chain import Chain
from blockpull._driver import Driver
from blockpull._fileio import File
from blockpull._inflight import Chunk
from blockpull._q2order import Qcow2Ordering

__pyx_capi__: Dict[str, Any]
VALUES: Tuple[str, ...]

@disjoint_base
class KeepPlan:
    mode: str
    reason: str
    ctype: int
    switch: bool
    def __init__(self, mode: str, reason: str, ctype: int = ..., switch: bool = ...,
                 eligible: Optional[Any] = ..., cs: int = ...) -> None: ...
    def apply(self, top: Driver) -> None: ...

@disjoint_base
class Packer:
    def __init__(self, top: Qcow2Ordering) -> None: ...
    def close(self) -> None: ...

def write_kept(f: File, ch: Chunk, cs: int, pieces: List[Tuple[int, List[bytes]]]) -> None: ...
def plan(chain: Chain, top: Driver, base_depth: int, compressed: str) -> KeepPlan: ...
