"""``pull(path, ...)``: open an image, pull it and wait, the blocking one-shot form."""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

from blockpull.budget import Budget
from blockpull.image import open as _open_image
from blockpull.job import PullInfo

__all__ = ["pull"]


def pull(path: Union[str, "os.PathLike[str]"], base: Optional[str] = None,
         bandwidth: Union[int, str] = 0,
         progress: Optional[Callable[[PullInfo], None]] = None,
         interval: float = 0.2, on_error: str = "report",
         budget: Optional[Budget] = None, compressed: str = "inflate",
         allow_data_file: bool = False) -> PullInfo:
    """Pull ``path`` (down to ``base``) and wait for it: the one-shot, blocking form.

    ``progress(info)`` is called from this thread every ``interval`` seconds and once at
    the end. Ctrl-C aborts the pull cleanly (the image stays valid and backed) and
    re-raises KeyboardInterrupt. ``budget``: a ``blockpull.Budget`` shared with other
    pulls. ``compressed="keep"`` keeps the backing's compressed clusters compressed in a
    qcow2 top where the formats allow (see ``PullJob.create``). ``allow_data_file``:
    follow external data files that backing images name (see ``blockpull.open``).
    Returns the final PullInfo or raises PullError (ValueError for a bad ``compressed``).
    """
    with _open_image(path, allow_data_file=allow_data_file) as img:
        job = img.pull(base=base, bandwidth=bandwidth, on_error=on_error, budget=budget,
                       compressed=compressed)
        try:
            while not job.wait(interval):
                if progress is not None:
                    progress(job.info())
        except KeyboardInterrupt:
            job.abort(wait=True)
            raise
        if progress is not None:
            progress(job.info())
        return job.result()
