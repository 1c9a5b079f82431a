"""Type stubs for the compiled module blockpull._streamerr."""
from typing_extensions import disjoint_base

@disjoint_base
class StreamErrors:
    errors: int
    done_front: int
