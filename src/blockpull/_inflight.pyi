"""Type stubs for the compiled module blockpull._inflight."""
from typing import Any, Dict, Optional

from typing_extensions import disjoint_base

from blockpull._chain import Chain
from blockpull._fileio import File
from blockpull._ratelimit import RateLimiter

#: the C functions that other compiled modules cimport (made by Cython)
__pyx_capi__: Dict[str, Any]

@disjoint_base
class Chunk: ...

@disjoint_base
class Flight:
    waiters: int
    def __init__(self, lock: Any, limiter: RateLimiter, cluster_size: int) -> None: ...
    def await_copies(self, offset: int, n: int) -> None: ...

def copy_on_read(chain: Chain, offset: int, n: int, buf: Any = ...,
                 flight: Optional[Flight] = ...) -> None: ...

def write_at_host(f: File, ch: Chunk, cs: int) -> None: ...
def write_at_guest(f: File, ch: Chunk, cs: int) -> None: ...
