"""Rank-aware logging: rank 0 prints INFO, other ranks only warnings and errors; every rank also
writes everything it logs, tracebacks included, to its own file in the run's folder
(:func:`add_rank_log`: ``<output_dir>/logs/rank_<R>.log``). A traceback goes to that file only
(:func:`log_traceback`): the console gets the one line that says what failed and where the
traceback is.

**Quiet libraries** (:data:`QUIET`, :func:`install_filters`): the lines megatron-core, NeMo,
OneLogger and torch print on every start that tell our users nothing they can act on are
filtered at omni-train's entry points (the CLI, each rank, the tools the CLI runs), each by its
message and the module or logger that says it; ``--verbose`` (``OMNI_TRAIN_VERBOSE=1``) shows
everything."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

_TRACE = "omni_train.trace"  # tracebacks: the rank log file only
VERBOSE_ENV = "OMNI_TRAIN_VERBOSE"  # "1": no filters, and torchrun's own output on the console


@dataclass(frozen=True)
class Quiet:
    """One line a library prints that our users cannot act on. ``source``: the warning's
    category, or ``"logging"`` for a log record; ``module``: a regex on the module that warns
    (matched at its start, as :func:`warnings.filterwarnings` does), or the logger's exact
    name; ``message``: a regex matched at the message's start; ``platform``: only there (the
    same line may be actionable elsewhere)."""

    source: type[Warning] | str
    module: str
    message: str
    why: str
    platform: str | None = None


QUIET: tuple[Quiet, ...] = (
    Quiet(UserWarning, r"megatron\.core\.", r"Transformer Engine and Apex are not installed",
          "megatron's import-time note of its fallbacks; the platform line each rank logs "
          "names the implementations omni-train chose (platform/)"),
    Quiet(UserWarning, r"megatron\.core\.models\.backends", r"Apex is not installed",
          "the same, for the norm: omni-train never uses Apex's"),
    Quiet(UserWarning, r"megatron\.core\.transformer\.transformer_config",
          r"full scope is deprecated",
          "megatron's own default cuda_graph_scope trips its deprecation; omni-train does not "
          "set it"),
    Quiet(UserWarning, r"megatron\.core\.optimizer\.optimizer",
          r"The \.grad attribute of a Tensor that is not a leaf Tensor",
          "torch, on megatron's optimizer probing main_grad/grad attributes of its own "
          "buffers; nothing of the user's"),
    Quiet(UserWarning, r"torch\.utils\.data\.dataloader",
          r"'pin_memory' argument is set as true but no accelerator is found",
          "pinned memory only matters with a GPU, where it is used; said on the CPU only"),
    Quiet(UserWarning, r"megatron\.core\.tensor_parallel\.layers",
          r"When using sequence parallelism it is recommended to set the environment "
          r"variable CUDA_DEVICE_MAX_CONNECTIONS",
          "a GPU setting (docs/gpu.md sets it there); meaningless on the CPU platform",
          platform="cpu"),
    Quiet(UserWarning, r"megatron\.core\.transformer\.transformer_config",
          r"If you are using transformer_engine as the transformer implementation, the "
          r"core_attn is from transformer_engine",
          "about Transformer Engine's fused attention, which the CPU platform never uses (its "
          "SDPA attention is what recompute.lm's core_attn recomputes)", platform="cpu"),
    Quiet("logging", "megatron.core.tensor_parallel.random",
          r".*CPU RNG state changed within GPU RNG context",
          "on the CPU the 'CUDA' RNG megatron's tracker forks *is* the CPU generator, so the "
          "check fires on every draw inside a fork (every MambaMixer init)", platform="cpu"),
    Quiet("logging", "megatron.core.rerun_state_machine",
          r"Implicit initialization of Rerun State Machine!|RerunStateMachine initialized in "
          r"mode RerunMode\.DISABLED",
          "megatron's result-validation machinery, which omni-train leaves disabled"),
    Quiet("logging", "nv_one_logger.api.config",
          r"OneLogger: Setting error_handling_strategy to DISABLE_QUIETLY",
          "NeMo's telemetry (OneLogger), imported with NeMo's audio encoder; omni-train "
          "configures no telemetry"),
    Quiet("logging", "nv_one_logger.training_telemetry.api.training_telemetry_provider",
          r"No exporters were provided\. This means that no telemetry data will be collected",
          "the same: no telemetry is wanted, so none is collected"),
)  # fmt: skip

_installed: set[Quiet] = set()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install_filters(platform: str | None = None) -> None:
    """Filter :data:`QUIET`'s lines in this process (those of ``platform`` too), unless
    verbose. Call it first thing in an entry point: megatron warns as it is imported, and a
    warning already shown cannot be taken back. Idempotent."""
    if verbose():
        return
    for q in QUIET:
        if q.platform not in (None, platform) or q in _installed:
            continue
        _installed.add(q)
        if q.source == "logging":
            logging.getLogger(q.module).addFilter(_MessageFilter(q.message))
        else:
            warnings.filterwarnings("ignore", q.message, q.source, q.module)


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
