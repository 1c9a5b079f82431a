"""Type stubs for the compiled module blockpull._qed."""
from typing import Any, Callable, Dict, List, Optional

from blockpull._driver import Driver
from blockpull._fileio import File

MAGIC: bytes
HEADER_BYTES: int
F_BACKING_FILE: int
F_NEED_CHECK: int
F_BACKING_RAW: int
KNOWN_FEATURES: int
MIN_CLUSTER_SIZE: int
MAX_CLUSTER_SIZE: int
DEFAULT_TABLE_SIZE: int
MAX_TABLE_SIZE: int

def max_image_size(cluster_size: int, table_size: int) -> int: ...

class Qed(Driver):
    table_size: int
    l1_offset: int
    table_bytes: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    next_free: int
    syncs: int
    sync_failures: int
    lock: Any
    def __init__(self, f: File, writable: bool) -> None: ...
    def write_zeroes(self, vaddr: int, n: int, fill: Optional[Callable[[int, Any], None]], backed: bool) -> None: ...
    def l1_entries(self) -> List[int]: ...
    def info(self) -> Dict[str, Any]: ...

def probe(head: bytes) -> bool: ...
def create(path: Any, size: int, cluster_size: int = ..., compat: Any = ...,
           backing: Optional[str] = ..., backing_format: Optional[str] = ...) -> None: ...
