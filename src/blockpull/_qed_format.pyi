"""Type stubs for the compiled module blockpull._qed_format."""
from typing import Any, Dict, Optional

from typing_extensions import disjoint_base

from blockpull._fileio import File
from blockpull._tablecache import CachedTable
from blockpull.errors import ImageFormatError

__pyx_capi__: Dict[str, Any]

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

@disjoint_base
class Table(CachedTable):
    def __new__(cls, offset: int, nbytes: int) -> Table: ...

@disjoint_base
class QedHeader:
    file_size: int
    cluster_size: int
    cluster_bits: int
    table_size: int
    table_bytes: int
    l2_entries: int
    l2_bits: int
    header_size: int
    header_end: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_offset: int
    size: int
    backing_offset: int
    backing_size: int
    backing_name: Optional[str]

def format_error(path: Any, msg: str) -> ImageFormatError: ...
def backing_name_slot(path: Any, bname: bytes, features: int, old_offset: int,
                      old_size: int, header_end: int) -> int: ...
def link_sector(sector0: bytes, features: int, offset: int, size: int) -> bytearray: ...
def max_image_size(cluster_size: int, table_size: int) -> int: ...
def read_header(f: File) -> QedHeader: ...
def probe(head: bytes) -> bool: ...
def create(path: Any, size: int, cluster_size: int = ..., compat: Any = ...,
           backing: Optional[str] = ..., backing_format: Optional[str] = ...,
           table_size: int = ...) -> None: ...
