"""Type stubs for the compiled module blockpull._plan."""
from typing import Any, Dict

from typing_extensions import disjoint_base

from blockpull._chain import Chain

#: the C functions that other compiled modules cimport (made by Cython)
__pyx_capi__: Dict[str, Any]

@disjoint_base
class Planner:
    def __init__(self, chain: Chain, base_depth: int) -> None: ...
