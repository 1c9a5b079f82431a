"""Type stubs for the compiled module blockpull._reader."""
from typing import Any

from typing_extensions import disjoint_base

from blockpull._chain import Chain

@disjoint_base
class BackingReader:
    def __init__(self, chain: Chain, lock: Any) -> None: ...

@disjoint_base
class ReaderPool:
    def __init__(self, chain: Chain, lock: Any) -> None: ...

@disjoint_base
class KeptSpan:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
