"""Type stubs for the compiled module blockpull._q2extdata."""
from typing import Any, Dict

from blockpull._q2sub import Qcow2Sub

__pyx_capi__: Dict[str, Any]


class Qcow2ExtData(Qcow2Sub):
    def data_offset_named(self, vaddr: int) -> bool: ...
