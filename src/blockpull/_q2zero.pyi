"""Type stubs for the compiled module blockpull._q2zero (C-level functions only)."""
from typing import Any, Dict

__pyx_capi__: Dict[str, Any]
