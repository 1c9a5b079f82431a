"""Type stubs for the compiled module blockpull._tablecache."""
from typing import Any, Hashable, List, Optional, Tuple

from typing_extensions import disjoint_base


@disjoint_base
class CachedTable:
    offset: int
    nbytes: int
    new: bool
    def __new__(cls, offset: int, nbytes: int) -> "CachedTable": ...


@disjoint_base
class Table(CachedTable):
    dirty: bool
    def __new__(cls, offset: int, nbytes: int) -> "Table": ...


@disjoint_base
class TableCache:
    capacity: int
    def __init__(self, capacity: int) -> None: ...
    def __len__(self) -> int: ...
    def __contains__(self, key: Any, /) -> bool: ...
    def keep(self, key: Hashable, t: CachedTable) -> None: ...
    def lookup(self, key: Hashable) -> Optional[CachedTable]: ...
    def values(self) -> List[CachedTable]: ...
    def items(self) -> List[Tuple[Any, CachedTable]]: ...
