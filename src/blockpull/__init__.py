"""blockpull: pull a copy-on-write disk image free of its backing chain while it is in use."""
from blockpull.errors import (BackingChainError, BlockpullError, ImageFormatError,
                              ImageLockedError, JobActiveError, PullCancelled, PullError)
from blockpull.image import ChainEntry, Extent, Image, create, open
from blockpull.check import CheckResult, check

__version__ = "0.1.0"

__all__ = [
    "BackingChainError", "BlockpullError", "ImageFormatError", "ImageLockedError",
    "JobActiveError", "PullCancelled", "PullError",
    "ChainEntry", "CheckResult", "Extent", "Image", "check", "create", "open",
]
