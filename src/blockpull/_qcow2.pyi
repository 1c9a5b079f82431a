"""Type stubs for the compiled module blockpull._qcow2."""
from typing import Any, Callable, Dict, List, Optional, Tuple

from typing_extensions import disjoint_base

from blockpull._driver import Driver
from blockpull._fileio import File
from blockpull._q2header import Header

MAGIC: bytes
EXT_END: int
EXT_BACKING_FORMAT: int
EXT_FEATURE_TABLE: int
EXT_BITMAPS: int
EXT_CRYPTO: int
EXT_DATA_FILE: int
INCOMPAT_DIRTY: int
INCOMPAT_CORRUPT: int
INCOMPAT_DATA_FILE: int
INCOMPAT_COMPRESSION: int
INCOMPAT_EXTL2: int
KNOWN_INCOMPAT: int
FEATURE_NAMES: List[Any]
AUTOCLEAR_BITMAPS: int

@disjoint_base
class Qcow2(Driver):
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
    def __init__(self, f: File, writable: bool, *, metadata_only: bool = ...,
                 l2_cache_bytes: int = ...) -> None: ...
    @property
    def rt_offset(self) -> int: ...
    @property
    def rt_clusters(self) -> int: ...
    @property
    def next_free(self) -> int: ...
    def refcount(self, cluster: int) -> int: ...
    def write_zeroes(self, vaddr: int, n: int, fill: Optional[Callable[[int, Any], None]], backed: bool) -> None: ...
    def info(self) -> Dict[str, Any]: ...

def probe(head: bytes) -> bool: ...
def create(path: Any, size: int, cluster_size: int = ..., compat: str = ...,
           backing: Optional[str] = ..., backing_format: Optional[str] = ...) -> None: ...
