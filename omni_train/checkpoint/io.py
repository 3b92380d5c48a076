"""Save and load stage checkpoints in megatron-core's torch_dist format.

Layout of a run directory::

    <output_dir>/checkpoints/step_0000012/   torch_dist checkpoint (model, optimizer, RNG, ...)
    <output_dir>/checkpoints/latest          name of the newest *complete* checkpoint
    <output_dir>/manifest.json               see manifest.py

Two ways in, kept apart on purpose:

* :func:`load_for_resume` continues an interrupted run of the same stage: weights, optimizer
  state, LR scheduler, RNG streams, data position and step. It needs the same parallel layout
  for the RNG streams (one per rank).
* :func:`load_weights` starts a new run from another checkpoint: model weights only, resharded
  to the current layout by dist_checkpointing (e.g. saved at TP=2, loaded at TP=1).

Across platforms: Transformer Engine layers add an ``_extra_state`` object per layer (FP8
scaling metadata) that the PyTorch layers do not have. A checkpoint written without TE loads
into a TE model with those objects left as initialised (no FP8 history: what a new FP8 run
starts with), and a TE checkpoint loads into a PyTorch model with them ignored. Parameters
must match exactly either way.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from omni_train.checkpoint.layout import LATEST as _LATEST
from omni_train.checkpoint.layout import checkpoints_dir, find_latest  # noqa: F401 (re-export)
from omni_train.parallel import ParallelState
from omni_train.stage.lifecycle import STOP_SIGNALS

# dp_reshardable: fully parallel save/load, no gathers. Resume keeps the TP/EP layout anyway
# (RNG streams are per rank); a change of layout goes through init_from (weights only).
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resume restores."""

    step: int = 0
    data: dict = field(default_factory=dict)  # data position and totals, same on every rank
    data_rank: bytes | None = None  # this rank's loader state (energon), None if not needed
    losses: list[float] = field(default_factory=list)  # per-step training losses so far
    grad_norms: list[float] = field(default_factory=list)  # per-step global grad norms
    wall_time_s: float = 0.0  # training time accumulated over earlier (interrupted) runs
    metrics: list[dict] = field(default_factory=list)  # every step's logged scalars
    evals: list[dict] = field(default_factory=list)  # every evaluation: step, loss, per modality
    stop_reason: str | None = None  # why this run stopped before train_steps (not saved)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank(name: str, ps: ParallelState, value) -> ShardedObject:
    # One object per rank (RNG streams, data loader positions): global shape = world size.
    return ShardedObject(name, value, (ps.world_size,), (ps.rank,), replica_id=0)


_EXTRA_STATE = "_extra_state"


def model_request(model, path: str | os.PathLike | None = None) -> dict:
    """``model.sharded_state_dict()``, less the TE ``_extra_state`` objects ``path`` lacks
    (a checkpoint written by PyTorch layers; see the module docstring)."""
    sharded = model.sharded_state_dict()
    if path is None or not any(k.endswith(_EXTRA_STATE) for k in sharded):
        return sharded
    saved = set(load_sharded_metadata(str(path)))
    return {
        k: v
        for k, v in sharded.items()
        if not (
            isinstance(v, ShardedObject) and k.endswith(_EXTRA_STATE) and v.unique_key not in saved
        )
    }


def load_model_state(model, state: dict, prefix: str = "") -> None:
    """``model.load_state_dict(state)`` where only ``_extra_state`` entries may be absent (and
    only keys under ``prefix`` are required)."""
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if k.startswith(prefix) and not k.endswith(_EXTRA_STATE)
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match the model{f' component {prefix[:-1]}' if prefix else ''}"
            f": missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def _sharded_state(
    model,
    optimizer,
    ps: ParallelState,
    *,
    is_loading: bool,
    data_rank: bytes | None = None,
    path: Path | None = None,
) -> dict:
    model_sd = model_request(model, path if is_loading else None)
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA
        ),
        "rng": _per_rank("rng_state", ps, _rng_state() if not is_loading else None),
        "data_rank": _per_rank("data_rank_state", ps, data_rank),
    }


@contextlib.contextmanager
def _helpers_ignore_stop_signals():
    """Block the stop signals while megatron saves. Its checkpoint writer starts helper
    processes (a multiprocessing manager) during the first save, and they inherit this signal
    mask. Slurm's SIGTERM (scancel, time limit, preemption) goes to every process of the job: a
    helper with the default disposition would die of it and break the very checkpoint the stop
    asks for (BrokenPipeError). Blocked, the helpers never act on it; this rank's own handler
    runs as soon as the save returns.

    multiprocessing's resource tracker is started first: starting it (which the helpers'
    "spawn" context does on first use) unblocks SIGINT and SIGTERM in the calling thread
    (bpo-33613), which would leave every helper started after it unprotected."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def save_checkpoint(
    output_dir: str | os.PathLike,
    model,
    optimizer,
    scheduler,
    state: TrainState,
    ps: ParallelState,
    keep_last: int = 0,
) -> Path:
    """Write a complete checkpoint for ``state.step`` (collective: every rank calls it)."""
    path = checkpoints_dir(output_dir) / f"step_{state.step:07d}"
    if ps.is_main:
        if path.exists():  # a partial write from a crashed run at this same step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded_state(model, optimizer, ps, is_loading=False, data_rank=state.data_rank)
    sharded["scheduler"] = scheduler.state_dict()
    sharded["train_state"] = {
        "step": state.step,
        "data": state.data,
        "losses": list(state.losses),
        "grad_norms": list(state.grad_norms),
        # per-rank timings differ slightly: rank 0's copy, identical in every rank's common state
        "metrics": _on_all_ranks(list(state.metrics)),
        "evals": list(state.evals),
        "wall_time_s": _on_all_ranks(state.wall_time_s),
        "world_size": ps.world_size,
    }
    try:
        with _helpers_ignore_stop_signals():
            dist_checkpointing.save(sharded, str(path))
    except BaseException:
        # e.g. ENOSPC: the partial step folder goes, so `latest` (still the previous
        # checkpoint) is what a rerun resumes and the rerun's save at this step starts clean
        if ps.is_main:
            shutil.rmtree(path, ignore_errors=True)
        raise
    dist.barrier()
    if ps.is_main:
        # Mark complete only now: a crash mid-save leaves the previous checkpoint as latest.
        tmp = checkpoints_dir(output_dir) / f".{_LATEST}.tmp"
        tmp.write_text(path.name)
        tmp.replace(checkpoints_dir(output_dir) / _LATEST)
        _prune(checkpoints_dir(output_dir), keep_last)
    dist.barrier()
    return path


def _on_all_ranks(value):
    """Rank 0's value: the common state must be identical on every rank, and per-rank
    timings differ slightly."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def check_resumable(path: Path, world_size: int) -> None:
    """Raise before anything is built if ``path`` cannot be resumed by ``world_size`` ranks."""
    saved_world = dist_checkpointing.load_common_state_dict(str(path))["train_state"]["world_size"]
    if saved_world != world_size:
        raise ValueError(
            f"cannot resume {path}: it was written by {saved_world} ranks, this job has "
            f"{world_size}. Resume with the same layout, or start a new run from its weights "
            f"with checkpoint.init_from={path} and a fresh checkpoint.output_dir"
        )


@torch.no_grad()  # in-place copies into parameters (and fp32 main-param views of them)
def load_for_resume(path: Path, model, optimizer, scheduler, ps: ParallelState) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG, data position and step from ``path``."""
    check_resumable(path, ps.world_size)
    sharded = _sharded_state(model, optimizer, ps, is_loading=True, path=path)
    loaded = dist_checkpointing.load(sharded, str(path))  # sharded entries + the common state
    load_model_state(model, loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    _set_rng_state(loaded["rng"])
    ts = loaded["train_state"]
    return TrainState(
        step=ts["step"],
        data=ts["data"],
        data_rank=loaded["data_rank"],
        losses=ts["losses"],
        grad_norms=ts["grad_norms"],
        metrics=ts.get("metrics", []),
        evals=ts.get("evals", []),
        wall_time_s=ts["wall_time_s"],
    )


@torch.no_grad()
def load_component_weights(path: str | os.PathLike, model, component: str) -> None:
    """Load one component's weights (keys ``<component>.*``) from a torch_dist checkpoint,
    e.g. a pretrained LM or encoder for stage 0; the rest of ``model`` is left as it is."""
    prefix = f"{component}."
    wanted = {k: v for k, v in model_request(model, path).items() if k.startswith(prefix)}
    if not wanted:
        raise ValueError(f"the model has no weights under {prefix}*")
    # load() returns the sharded entries asked for plus the checkpoint's common state
    loaded = dist_checkpointing.load({"model": wanted}, str(path))["model"]
    try:
        load_model_state(model, loaded, prefix)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


@torch.no_grad()
def load_weights(path: str | os.PathLike, model) -> None:
    """Load model weights only (any parallel layout), e.g. from the previous stage."""
    path = Path(path)
    if (path / "checkpoints").is_dir():  # a run directory: take its latest checkpoint
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"checkpoint.init_from={path} holds no complete checkpoint")
        path = latest
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"checkpoint.init_from={path} is not a torch_dist checkpoint (no metadata.json)"
        )
    loaded = dist_checkpointing.load({"model": model_request(model, path)}, str(path))
    load_model_state(model, loaded["model"])
