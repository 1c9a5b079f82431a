"""Type stubs for the compiled module blockpull._q2order."""
from typing import Any, List, Optional, Tuple

from typing_extensions import disjoint_base

from blockpull._driver import Driver
from blockpull._q2header import Header

AUTOCLEAR_BITMAPS: int
AUTOCLEAR_DATA_RAW: int




@disjoint_base
class Qcow2Ordering(Driver):
    version: int
    refcount_order: int
    l1_offset: int
    l1_size: int
    incompatible: int
    compatible: int
    autoclear: int
    header_length: int
    nb_snapshots: int
    snapshots_offset: int
    compression_type: int
    extensions: List[Any]
    backing_offset: int
    backing_size: int
    extended_l2: bool
    lock: Any
    header: Header
    syncs: int
    bitmaps: Optional[Any]
    metadata_only: bool
    crypt_method: int
    crypto_header: Optional[Tuple[int, int]]
    sync_failures: int
    def sync_all(self) -> None: ...
