"""Type stubs for the compiled module blockpull._plan."""
from typing_extensions import disjoint_base

from blockpull._chain import Chain

@disjoint_base
class Planner:
    def __init__(self, chain: Chain, base_depth: int) -> None: ...
