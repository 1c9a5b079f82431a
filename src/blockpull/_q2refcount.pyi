"""Type stubs for the compiled module blockpull._q2refcount."""
from typing_extensions import disjoint_base

from blockpull._fileio import File

RB_CACHE_BYTES: int
MAX_REFTABLE_BYTES: int


@disjoint_base
class Refcounts:
    refcount_order: int
    next_free: int
    file_size: int
    def __init__(self, f: File, cluster_bits: int, refcount_order: int, rt_offset: int,
                 rt_clusters: int, file_size: int) -> None: ...
    @property
    def offset(self) -> int: ...
    @property
    def clusters(self) -> int: ...
