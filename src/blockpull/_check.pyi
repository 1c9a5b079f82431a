"""Type stubs for the compiled module blockpull._check."""
from typing import Any, Dict, List, Optional, Set, Tuple

from typing_extensions import disjoint_base

from blockpull._fileio import File

MAX_L1_BYTES: int
MAX_SNAPSHOTS_BYTES: int
MAX_SNAPSHOTS: int
MAX_SNAPSHOT_EXTRA: int
MAX_MESSAGES: int
ROLE_NAMES: List[str]
AREA_ROLES: Dict[str, int]

def parse_snapshot_table(f: File, offset: int, count: int, cluster_bits: int,
                         file_size: int) -> Tuple[List[Tuple[int, int, str, str, int]], int]: ...

@disjoint_base
class Qcow2Check:
    corruptions: int
    leaks: int
    check_errors: int
    skipped: int
    allocated_clusters: int
    compressed_clusters: int
    highest: int
    messages: List[str]
    dropped_messages: int
    fragmented_clusters: int
    hdr: Dict[str, Any]
    def __init__(self, f: File, hdr: Dict[str, Any], file_size: int) -> None: ...
    def run(self, snapshots: List[Any], areas: Optional[List[Tuple[int, int, str]]] = ...) -> Any: ...
    def check_flags(self, fixable: Any = ..., all_flags: bool = ...) -> Any: ...
    def leaked_blocks(self) -> Any: ...
    def recounted_blocks(self) -> List[Tuple[int, bytes, List[int]]]: ...
    def uncovered(self) -> List[int]: ...
    def set_stored(self, c: int, v: int) -> None: ...
    def stored_count(self, c: int) -> int: ...
    def expected_count(self, c: int) -> int: ...
    def rebuild_in_use(self) -> List[int]: ...
    def rebuilt_block(self, idx: int, new_start: int,
                      new_end: int) -> Tuple[bytes, int, int, int, int]: ...
