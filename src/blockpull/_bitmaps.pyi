"""Type stubs for the compiled module blockpull._bitmaps."""
from typing import Any, Callable, Dict, List, Set, Tuple

from typing_extensions import disjoint_base

AUTOCLEAR_BITMAPS: int
FLAG_IN_USE: int
FLAG_AUTO: int
KNOWN_FLAGS: int
TYPE_DIRTY_TRACKING: int
TABLE_RESERVED: int
TABLE_OFFSET_MASK: int
TABLE_ALL_ONES: int
MAX_BITMAPS: int
MAX_DIRECTORY_BYTES: int
MAX_TABLE_ENTRIES: int
MAX_DATA_BYTES: int
MIN_GRANULARITY_BITS: int
MAX_GRANULARITY_BITS: int
MAX_NAME_BYTES: int

@disjoint_base
class Bitmap:
    name: str
    entry_offset: int
    flags: int
    granularity_bits: int
    table_offset: int
    table_size: int
    table: List[int]
    chunks: Dict[int, bytearray]
    dirty: Set[int]
    pending: Set[int]
    @property
    def enabled(self) -> bool: ...
    @property
    def in_use(self) -> bool: ...
    def data_clusters(self) -> List[int]: ...

def parse_bitmaps(f: Any, ext: bytes, cluster_bits: int, size: int,
                  file_size: int) -> Tuple[int, int, List[Bitmap]]: ...

@disjoint_base
class Bitmaps:
    bitmaps: List[Bitmap]
    enabled: List[Bitmap]
    active: bool
    def __init__(self, f: Any, ext: bytes, cluster_bits: int, size: int, file_size: int,
                 refcount: Callable[[int], int]) -> None: ...
    @property
    def tracking(self) -> bool: ...
    def set_in_use(self, on: bool) -> None: ...
    def mark(self, vaddr: int, n: int) -> None: ...
    def write_data(self, alloc: Callable[[int], int], free: Callable[[int, int], None]) -> None: ...
    def write_tables(self) -> bool: ...
