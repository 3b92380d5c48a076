"""Where a run's checkpoints live (pure pathlib: the launcher reads it without megatron-core).

::

    <output_dir>/checkpoints/step_0000012/   one torch_dist checkpoint
    <output_dir>/checkpoints/latest          name of the newest *complete* checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path

LATEST = "latest"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    tracker = checkpoints_dir(output_dir) / LATEST
    if not tracker.is_file():
        return None
    path = checkpoints_dir(output_dir) / tracker.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{tracker} names {path.name}, which does not exist")
    return path
