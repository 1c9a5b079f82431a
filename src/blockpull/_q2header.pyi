"""Type stubs for the compiled module blockpull._q2header."""
from typing import Any, Callable, List, Optional, Tuple

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
AUTOCLEAR_DATA_RAW: int
MAX_L1_BYTES: int
MAX_REFTABLE_BYTES: int
MAX_VIRTUAL_SIZE: int
MAX_SNAPSHOTS_BYTES: int
MAX_SNAPSHOTS: int
MAX_SNAPSHOT_EXTRA: int
FEATURE_NAMES: List[Tuple[int, int, bytes]]

def probe(head: bytes) -> bool: ...
def parse_snapshot_table(f: File, offset: int, count: int, cluster_bits: int,
                         file_size: int) -> Tuple[List[Tuple[int, int, str, str, int]], int]: ...
def create(path: Any, size: int, cluster_size: int = ..., compat: str = ...,
           backing: Optional[str] = ..., backing_format: Optional[str] = ...) -> None: ...

class Header:
    path: Any
    file_size: int
    metadata_only: bool
    version: int
    cluster_bits: int
    cluster_size: int
    crypt_method: int
    size: int
    incompatible: int
    compatible: int
    autoclear: int
    refcount_order: int
    header_length: int
    compression_type: int
    extended_l2: bool
    l2_bits: int
    l1_offset: int
    l1_size: int
    rt_offset: int
    rt_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    snapshots: List[Tuple[int, int, str, str, int]]
    extensions: List[Tuple[int, bytes, int]]
    backing_name: Optional[str]
    backing_format: Optional[str]
    backing_offset: int
    backing_size: int
    crypto_header: Optional[Tuple[int, int]]
    @classmethod
    def read(cls, f: File, file_size: int, writable: bool, metadata_only: bool) -> "Header": ...
    def write_autoclear(self, f: File, bits: int) -> None: ...
    def write_reftable(self, f: File, offset: int, clusters: int) -> None: ...
    def write_compression_type(self, f: File, ctype: int) -> None: ...
    def set_backing(self, f: File, name: Optional[str], fmt: Optional[str],
                    sync: Callable[[], None]) -> None: ...
