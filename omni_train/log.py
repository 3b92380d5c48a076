"""Rank-aware logging: rank 0 prints INFO, other ranks only warnings and errors; every rank also
writes everything it logs, tracebacks included, to its own file in the run's folder
(:func:`add_rank_log`: ``<output_dir>/logs/rank_<R>.log``). A traceback goes to that file only
(:func:`log_traceback`): the console gets the one line that says what failed and where the
traceback is."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

_TRACE = "omni_train.trace"  # tracebacks: the rank log file only


def _rank() -> str:
    return os.environ.get("RANK", "0")


def get_logger(name: str = "omni_train") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers and name != _TRACE:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{_rank()}] %(message)s",
                                               "%H:%M:%S"))  # fmt: skip
        handler.setLevel(logging.INFO if _rank() == "0" else logging.WARNING)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def rank_log_path(output_dir: str | os.PathLike, rank: str | int | None = None) -> Path:
    return Path(output_dir) / "logs" / f"rank_{_rank() if rank is None else rank}.log"


def error_path(output_dir: str | os.PathLike, rank: str | int) -> Path:
    """Where a rank that failed leaves its one-line error for the launcher."""
    return Path(output_dir) / "logs" / f"rank_{rank}.error"


def add_rank_log(output_dir: str | os.PathLike) -> Path | None:
    """Also write this rank's log, and its tracebacks, to ``<output_dir>/logs/rank_<R>.log``
    (appended: a resumed run adds to it). None when the file cannot be opened."""
    path = rank_log_path(output_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    for name in ("omni_train", _TRACE):
        logger = get_logger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(handler)
    return path


def log_traceback(message: str) -> None:
    """``message`` and the exception being handled, to this rank's log file only (nowhere
    before :func:`add_rank_log`)."""
    logger = logging.getLogger(_TRACE)
    logger.propagate = False
    if logger.handlers:
        logger.error(message, exc_info=True)


def human_bytes(n: float) -> str:
    """``1.23 GB``-style sizes (decimal units, as ``df -H``)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} PB"
