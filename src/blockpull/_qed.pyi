"""Type stubs for the compiled module blockpull._qed."""
from typing import Any, Callable, Dict, Optional

from typing_extensions import disjoint_base

from blockpull._driver import Driver
from blockpull._fileio import File

from blockpull._qed_format import (DEFAULT_TABLE_SIZE as DEFAULT_TABLE_SIZE,
                                   F_BACKING_FILE as F_BACKING_FILE,
                                   F_BACKING_RAW as F_BACKING_RAW,
                                   F_NEED_CHECK as F_NEED_CHECK, HEADER_BYTES as HEADER_BYTES,
                                   KNOWN_FEATURES as KNOWN_FEATURES, MAGIC as MAGIC,
                                   MAX_CLUSTER_SIZE as MAX_CLUSTER_SIZE,
                                   MAX_TABLE_SIZE as MAX_TABLE_SIZE,
                                   MIN_CLUSTER_SIZE as MIN_CLUSTER_SIZE,
                                   backing_name_slot as backing_name_slot, create as create,
                                   link_sector as link_sector,
                                   format_error as format_error,
                                   max_image_size as max_image_size, probe as probe)

@disjoint_base
class Qed(Driver):
    table_size: int
    l1_offset: int
    backing_offset: int
    backing_size: int
    table_bytes: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    next_free: int
    syncs: int
    sync_failures: int
    lock: Any
    def __init__(self, f: File, writable: bool, *, l2_cache_bytes: int = ...) -> None: ...
    def write_zeroes(self, vaddr: int, n: int, fill: Optional[Callable[[int, Any], None]], backed: bool) -> None: ...
    def info(self) -> Dict[str, Any]: ...
