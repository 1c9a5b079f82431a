"""Type stubs for the compiled module blockpull._raw."""
from typing_extensions import disjoint_base

from blockpull._driver import Driver
from blockpull._fileio import File

@disjoint_base
class Raw(Driver):
    def __init__(self, f: File, writable: bool = ...) -> None: ...

def probe(head: bytes) -> bool: ...
