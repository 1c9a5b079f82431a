"""The words of the pull API: the statuses a job takes and the error policies it follows.

Both are ``str`` enums: a member equals its word (``JobStatus.RUNNING == "running"``),
prints as it (``str``, f-strings, JSON), and a caller may pass the plain word.
"""
from __future__ import annotations

from enum import Enum

__all__ = ["JobStatus", "OnError"]


class _Word(str, Enum):
    """A ``str`` enum whose members print as their word, not as ``Class.NAME``."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class JobStatus(_Word):
    """What ``PullJob.status`` (and ``PullInfo.status``) says: running or paused while the
    job lives, then exactly one of completed, failed, cancelled."""
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class OnError(_Word):
    """What an I/O error does to a pull (QMP block-stream's ``on-error``, the subset that
    applies): REPORT fails the job, STOP pauses it until ``resume()`` and then retries
    the chunk, IGNORE counts the chunk as an error and carries on (the backing file is
    then kept)."""
    REPORT = "report"
    STOP = "stop"
    IGNORE = "ignore"

    @classmethod
    def parse(cls, value: str) -> "OnError":
        """``value`` as an OnError; raises ValueError naming the three words otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"on_error must be one of {', '.join(m.value for m in cls)}, "
                             f"not {value!r}") from None
