"""One bandwidth shared by many pulls.

A ``Budget`` is a rate limiter that any number of running pulls draw on together: the sum of
their copying stays within the budget, each draw takes the next slot of one schedule, so jobs
that can use their share get equal shares (slots go round in the order jobs ask for them), and
a job that ends, pauses or is aborted stops drawing, which gives its share to the others at
once. Time in which no job draws (before the first starts, all paused) is not saved up for
a burst. A job's own ``bandwidth`` still applies inside the budget; each job copies in steps
of about 1/64 s of the budget.
"""
from __future__ import annotations

from typing import Union

from blockpull._ratelimit import RateLimiter
from blockpull.units import format_size, parse_bandwidth


class Budget:
    """A bandwidth in bytes/s (0: unlimited) shared by every pull started with it.

    ``bandwidth`` takes an int (bytes/s) or a string such as ``"200M"`` (MiB/s).
    ``limiter`` is its schedule (``limiter.charged``: the bytes its pulls paid for, the
    clusters they read and copied).
    Raises ValueError for a negative or malformed bandwidth.
    """

    def __init__(self, bandwidth: Union[int, str] = 0) -> None:
        self.limiter = RateLimiter(parse_bandwidth(bandwidth))

    @property
    def bandwidth(self) -> int:
        """The budget in bytes/s (0: unlimited)."""
        return int(self.limiter.rate)

    def set_speed(self, bandwidth: Union[int, str]) -> None:
        """Change the budget now, for every job that draws on it (bytes/s or ``"200M"``).
        Raises ValueError for a negative or malformed bandwidth."""
        self.limiter.set_rate(parse_bandwidth(bandwidth))

    def job_limiter(self, bandwidth: int = 0) -> RateLimiter:
        """A job's own limiter (``bandwidth`` bytes/s, 0: only the budget) inside this budget."""
        return RateLimiter(bandwidth, self.limiter)

    def __repr__(self) -> str:
        bw = self.bandwidth
        return "Budget(%s)" % (format_size(bw) + "/s" if bw else "unlimited")
