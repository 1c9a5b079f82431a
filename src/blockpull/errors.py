"""The exception hierarchy. Every error a user can cause derives from BlockpullError."""
from __future__ import annotations

from typing import Optional

__all__ = [
    "BlockpullError",
    "ImageFormatError",
    "InconsistentBitmapError",
    "DataFileNotAllowedError",
    "BackingChainError",
    "ImageLockedError",
    "ImageNotFoundError",
    "JobActiveError",
    "PullError",
    "PullCancelled",
    "StreamIOError",
    "ServeError",
    "QemuError",
]


class BlockpullError(Exception):
    """Base class of every error blockpull raises on purpose."""


class ImageFormatError(BlockpullError, ValueError):
    """Not an image of the stated format, a malformed one, or an unsupported feature."""


class InconsistentBitmapError(ImageFormatError):
    """A persistent dirty bitmap is marked in use: the program that last wrote the image
    stopped without saving it, so its bits are unknown (QEMU's docs/interop/qcow2.rst,
    "Bitmap directory", flag ``in_use``). The image opens read-only; to write to it,
    remove the bitmap (``qemu-img bitmap --remove``). ``bitmap`` names it."""

    def __init__(self, message: str, bitmap: Optional[str] = None) -> None:
        super().__init__(message)
        self.bitmap = bitmap


class DataFileNotAllowedError(ImageFormatError):
    """A backing image names an external data file (qcow2 incompatible bit 2), which is
    not followed unless the caller allows it: a backing's data file name could point at
    any file (QEMU's rule since CVE-2024-32498). Pass ``allow_data_file=True`` (the
    command line's ``--allow-data-file``) for a chain you trust."""


class BackingChainError(BlockpullError):
    """A backing file is missing, unsafe, loops, or has no recorded format."""


class ImageLockedError(BlockpullError):
    """Another process (QEMU or blockpull) holds a conflicting lock on the image."""


class ImageNotFoundError(BlockpullError, FileNotFoundError):
    """The image file does not exist (also a FileNotFoundError)."""


class JobActiveError(BlockpullError):
    """A pull is already running on that image."""


class PullError(BlockpullError):
    """A pull failed. ``errno``, ``operation`` ("read" or "write") and ``offset`` say where."""

    def __init__(self, message: str, errno: Optional[int] = None,
                 operation: Optional[str] = None, offset: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.operation = operation
        self.offset = offset


class StreamIOError(Exception):
    """An I/O error inside the copy loop, tagged with the operation ("read" or "write")
    and the offset (bytes into the virtual disk) where it happened; ``exc`` is the
    OSError and ``errno`` its errno (None if it has none). The job turns it into a
    PullError under its error policy; it reaches no caller of the public API."""

    def __init__(self, exc: BaseException, operation: str, offset: int) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.errno: Optional[int] = getattr(exc, "errno", None)
        self.operation = operation
        self.offset = offset


class PullCancelled(BlockpullError):
    """The pull was aborted; the image is valid and still backed."""


class ServeError(BlockpullError, ValueError):
    """An image cannot be served as asked (bad socket, address, TLS or export options)."""


class QemuError(BlockpullError):
    """QEMU could not be reached over QMP, or refused a command. ``error_class`` is the QMP
    error class ("GenericError", "DeviceNotActive", ...; None if QEMU gave no reply) and
    ``desc`` QEMU's own words."""

    def __init__(self, message: str, error_class: Optional[str] = None,
                 desc: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class
        self.desc = desc


def lost_writes_error(path: str, exc: BaseException) -> OSError:
    """The OSError (EIO) every flush of the image at ``path`` raises once a failed
    fdatasync (``exc``) may have lost guest writes made before it."""
    import errno
    return OSError(errno.EIO, "an earlier fdatasync failed (%s): writes made before it "
                   "may not be on disk, and no later flush can make them so; close the "
                   "image and check what was written since the last successful flush"
                   % (getattr(exc, "strerror", None) or exc), path)
