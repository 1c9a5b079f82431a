"""Type stubs for the compiled module blockpull._qcow2."""
from typing import Any, Callable, Dict, List, Optional, Tuple

from blockpull._driver import Driver
from blockpull._q2extdata import Qcow2ExtData
from blockpull._fileio import File

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
AUTOCLEAR_DATA_RAW: int

class Qcow2(Qcow2ExtData):
    def __init__(self, f: File, writable: bool, *, metadata_only: bool = ...,
                 l2_cache_bytes: int = ...) -> None: ...
    @property
    def rt_offset(self) -> int: ...
    @property
    def rt_clusters(self) -> int: ...
    @property
    def next_free(self) -> int: ...
    @property
    def data_file_name(self) -> Optional[str]: ...
    @property
    def data_file_raw(self) -> bool: ...
    def refcount(self, cluster: int) -> int: ...
    def link_compressed(self, vaddr: int, entry: int) -> bool: ...
    def write_zeroes(self, vaddr: int, n: int, fill: Optional[Callable[[int, Any], None]], backed: bool) -> None: ...
    def info(self) -> Dict[str, Any]: ...

def probe(head: bytes) -> bool: ...
def create(path: Any, size: int, cluster_size: int = ..., compat: str = ...,
           backing: Optional[str] = ..., backing_format: Optional[str] = ...) -> None: ...
