"""blockpull: pull a copy-on-write disk image free of its backing chain while it is in use.

The Python API is the product: ``open``/``create`` images, ``Image.pull()`` starts a
``PullJob`` (progress, speed, pause, abort, events, asyncio), ``pull()`` is the blocking
one-shot, and the libvirt-shaped functions (``block_pull`` ...) sit on top.
"""
import logging as _logging
from typing import TYPE_CHECKING, Any

from blockpull.compat import (BLOCK_JOB_SPEED_BANDWIDTH_BYTES, BLOCK_PULL_BANDWIDTH_BYTES,
                              BLOCK_PULL_CANCELED, BLOCK_PULL_COMPLETED, BLOCK_PULL_FAILED,
                              EVENT_ID_BLOCK_PULL, BlockPullInfo, block_job_set_speed,
                              block_pull, block_pull_abort, event_deregister, event_register,
                              get_block_pull_info)
from blockpull.errors import (BackingChainError, BlockpullError, DataFileNotAllowedError,
                              ImageFormatError,
                              ImageLockedError, ImageNotFoundError, InconsistentBitmapError,
                              JobActiveError, PullCancelled, PullError, QemuError, ServeError)
from blockpull.image import ChainEntry, Extent, Image, create, open
from blockpull.budget import Budget
from blockpull.checker import CheckResult, check
from blockpull.job import PullEvent, PullInfo, PullJob
from blockpull.oneshot import pull
from blockpull.policy import JobStatus, OnError

if TYPE_CHECKING:  # pragma: no cover
    from blockpull import qemu
    from blockpull.nbd import Server, serve

#: names imported on first use: serving (asyncio, ssl) and QMP steering cost tens of
#: milliseconds to import, which every short command line run would pay otherwise
_LAZY = {"Server": ("blockpull.nbd", "Server"), "serve": ("blockpull.nbd", "serve"),
         "qemu": ("blockpull.qemu", None)}


def __getattr__(name: str) -> Any:
    """``blockpull.serve``, ``blockpull.Server`` and ``blockpull.qemu``, imported on first
    use (PEP 562)."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'blockpull' has no attribute {name!r}") from None
    import importlib
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value

_logging.getLogger("blockpull").addHandler(_logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "BackingChainError", "BlockpullError", "DataFileNotAllowedError", "ImageFormatError",
    "ImageLockedError",
    "ImageNotFoundError", "InconsistentBitmapError", "JobActiveError", "PullCancelled", "PullError", "QemuError",
    "ServeError", "Server", "serve",
    "ChainEntry", "CheckResult", "Extent", "Image", "check", "create", "open",
    "JobStatus", "OnError", "PullEvent", "PullInfo", "PullJob", "pull",
    "BlockPullInfo", "block_pull", "get_block_pull_info", "block_pull_abort",
    "block_job_set_speed", "event_register", "event_deregister",
    "BLOCK_PULL_COMPLETED", "BLOCK_PULL_FAILED", "BLOCK_PULL_CANCELED",
    "BLOCK_PULL_BANDWIDTH_BYTES", "BLOCK_JOB_SPEED_BANDWIDTH_BYTES", "EVENT_ID_BLOCK_PULL",
]
