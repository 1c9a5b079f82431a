"""Type stubs for the compiled module blockpull._qed_check."""
from typing import List, Tuple

from typing_extensions import disjoint_base

from blockpull._fileio import File

@disjoint_base
class QedCheck:
    corruptions: int
    leaks: int
    allocated_clusters: int
    fragmented_clusters: int
    image_end_offset: int
    total_clusters: int
    messages: List[str]

def check_qed(f: File) -> QedCheck: ...
def repair_qed(f: File) -> Tuple[int, QedCheck]: ...
