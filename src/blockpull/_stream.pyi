"""Type stubs for the compiled module blockpull._stream."""
from typing import Any, Optional

from typing_extensions import disjoint_base

from blockpull._chain import Chain
from blockpull._driver import Driver
from blockpull._inflight import Flight
from blockpull._q2keep import KeepPlan
from blockpull._ratelimit import RateLimiter
from blockpull._streamerr import StreamErrors

DEFAULT_CHUNK: int
DEFAULT_BATCH: int
DEFAULT_DEPTH: int
DEFAULT_READ_DEPTH: int
MAX_READ_DEPTH: int

@disjoint_base
class Stream(StreamErrors):
    flight: Flight
    base_depth: int
    keep_base: bool
    limiter: RateLimiter
    cur: int
    end: int
    copied: int
    zeroed: int
    skipped_zero: int
    plan_pos: int
    tracking: bool
    cancel_requested: bool
    pause_requested: bool
    chunk: int
    batch: int
    direct: bool
    depth: int
    read_depth: int
    keep: Optional[KeepPlan]
    kept: int
    def __init__(self, chain: Chain, top: Driver, lock: Any, base_depth: int,
                 limiter: RateLimiter, control: Any = ..., chunk: int = ...,
                 batch: int = ...) -> None: ...
    def prepare(self) -> int: ...
    def guest_write_begin(self, offset: int, n: int) -> int: ...
    def guest_write_end(self, offset: int, n: int, before: int) -> None: ...
    def await_copies(self, offset: int, n: int) -> None: ...
    def run(self) -> str: ...
    def finish_sync(self) -> None: ...
    def intact(self) -> bool: ...
