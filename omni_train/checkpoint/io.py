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
import math
import os
import pickle
import random
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from omni_train.checkpoint import integrity
from omni_train.checkpoint import peft as peft_record
from omni_train.checkpoint.layout import LATEST as _LATEST
from omni_train.checkpoint.layout import checkpoints_dir, find_latest  # noqa: F401 (re-export)
from omni_train.config.peft import PeftConfig
from omni_train.lifecycle import STOP_SIGNALS
from omni_train.log import human_bytes
from omni_train.model.lora import merge_saved_adapters
from omni_train.parallel import ParallelState

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


def model_request(model, path: str | os.PathLike | None = None, keep=None) -> dict:
    """``model.sharded_state_dict()`` (only the keys ``keep(key)`` accepts), less the TE
    ``_extra_state`` objects ``path`` lacks (a checkpoint written by PyTorch layers; see the
    module docstring)."""
    sharded = model.sharded_state_dict()
    if keep is not None:
        sharded = {k: v for k, v in sharded.items() if keep(k)}
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


def load_model_state(model, state: dict, prefix: str = "", required=None) -> None:
    """``model.load_state_dict(state)`` where only ``_extra_state`` entries may be absent (and
    only keys under ``prefix`` that ``required(key)`` accepts are required)."""
    result = model.load_state_dict(state, strict=False)
    missing = [
        k
        for k in result.missing_keys
        if k.startswith(prefix)
        and not k.endswith(_EXTRA_STATE)
        and (required is None or required(k))
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
    keep=None,
) -> dict:
    model_sd = model_request(model, path if is_loading else None, keep)
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
    integrity: str = "head_tail",
    lora: dict | None = None,
) -> Path:
    """Write a complete checkpoint for ``state.step`` (collective: every rank calls it): the
    torch_dist state, then its integrity record (every rank digests the files it wrote), then
    ``latest``. ``lora``: a LoRA stage's record (:mod:`omni_train.checkpoint.peft`); with a
    base, only the adapters and the components trained whole are written."""
    path = checkpoints_dir(output_dir) / f"step_{state.step:07d}"
    if ps.is_main:
        if path.exists():  # a partial write from a crashed run at this same step
            shutil.rmtree(path)
        for leftover in checkpoints_dir(output_dir).glob(".partial-step_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        path.mkdir(parents=True)
    dist.barrier()
    sharded = _sharded_state(
        model,
        optimizer,
        ps,
        is_loading=False,
        data_rank=state.data_rank,
        keep=lambda k: peft_record.holds(lora, k),
    )
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
    payload, entries = _sum_over_ranks(*_payload_bytes(sharded))
    try:
        check_space(path, space_needed(payload, entries), ps, f"the checkpoint {path.name}")
    except CheckpointSpaceError as e:  # nothing written: the previous checkpoint stays latest
        if ps.is_main:
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointSpaceError(
            f"{e}; the previous checkpoint is intact. Free space (or lower "
            "checkpoint.keep_last) and run the same command to resume"
        ) from None
    try:
        with _helpers_ignore_stop_signals():
            dist_checkpointing.save(sharded, str(path))
    except BaseException:
        # e.g. ENOSPC: the partial step folder goes, so `latest` (still the previous
        # checkpoint) is what a rerun resumes and the rerun's save at this step starts clean.
        # Renamed first: another rank may still be writing into it (a barrier could hang on a
        # rank that died), and a write that comes late then fails instead of re-creating it.
        if ps.is_main:
            _discard(path)
        raise
    if ps.is_main and lora is not None:  # before the integrity record, which then covers it
        peft_record.write_record(path, lora)
    dist.barrier()
    _record_integrity(path, ps, integrity, payload, entries)
    if ps.is_main:
        # Mark complete only now: a crash mid-save leaves the previous checkpoint as latest.
        tmp = checkpoints_dir(output_dir) / f".{_LATEST}.tmp"
        tmp.write_text(path.name)
        tmp.replace(checkpoints_dir(output_dir) / _LATEST)
        _prune(checkpoints_dir(output_dir), keep_last)
    dist.barrier()
    return path


# What a save writes beyond its tensors' bytes: torch_dist's .metadata and per-tensor framing in
# the .distcp files, and the common state. Measured on the tiny model: 1.31x the payload, about
# 1.3 kB per tensor entry; the allowance below (5 % + 4 KiB per entry + 16 MiB) covers that.
_PER_ENTRY, _FIXED = 4096, 16 * 1024**2


class CheckpointSpaceError(OSError):
    """Not enough free space to save a checkpoint (checked before anything is written)."""


def _payload_bytes(sharded: dict) -> tuple[int, int]:
    """(bytes, entries) of the tensors and objects this rank writes (each shard counted once:
    its main replica's rank writes it)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    size = entries = 0
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id):
            r = v.flattened_range
            numel = r.stop - r.start if r is not None else math.prod(v.local_shape)
            size, entries = size + numel * v.data.element_size(), entries + 1
        elif isinstance(v, ShardedObject) and is_main_replica(v.replica_id):
            size, entries = size + len(pickle.dumps(v.data)), entries + 1
    return size, entries


def _sum_over_ranks(*values: int) -> list[int]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return [int(x) for x in t.tolist()]


def space_needed(payload: int, entries: int) -> int:
    """Free space to ask for before writing a checkpoint of ``payload`` bytes in ``entries``
    tensors and objects (never less than the save writes: see the allowance above)."""
    return int(payload * 1.05) + entries * _PER_ENTRY + _FIXED


def expected_checkpoint(model, optimizer_bytes_per_param: int, lora=None) -> tuple[int, int]:
    """(bytes, entries) a checkpoint of this model and layout will hold, before any step
    (collective): the model's sharded state exactly (an adapter checkpoint's part of it, under
    the LoRA record ``lora``), plus the optimizer's state of every trainable shard
    (``optimizer_bytes_per_param``: AdamW's two fp32 moments, and the fp32 main copy under
    bf16), plus the per-rank RNG and data objects."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    sharded = model_request(model, keep=lambda k: peft_record.holds(lora, k))
    size, entries = _payload_bytes(sharded)
    for v in nested_values(sharded):
        trainable = isinstance(v, ShardedTensor) and getattr(v.data, "requires_grad", False)
        if trainable and is_main_replica(v.replica_id):
            size += math.prod(v.local_shape) * optimizer_bytes_per_param
            entries += 2
    size += len(pickle.dumps(_rng_state())) + 64 * 1024  # RNG streams, loader position
    return tuple(_sum_over_ranks(size, entries + 2))


def check_space(directory: Path, need: int, ps: ParallelState, what: str) -> None:
    """Raise :class:`CheckpointSpaceError` on every rank unless ``directory`` has ``need``
    bytes free (rank 0 looks). Collective."""
    free = shutil.disk_usage(directory).free if ps.is_main else 0
    box = [free]
    dist.broadcast_object_list(box, src=0)
    if box[0] < need:
        raise CheckpointSpaceError(
            f"not enough space for {what}: it takes about {human_bytes(need)} and {directory} "
            f"has {human_bytes(box[0])} free"
        )


def _record_integrity(path: Path, ps: ParallelState, mode: str, payload: int, entries: int) -> None:
    """Each rank digests the files it wrote; rank 0 the rest, then writes the record (with the
    tensor payload the save was checked against)."""
    names = integrity.files_of(path)
    mine = [
        n
        for n in names
        if integrity.writer_rank(n) == ps.rank
        or (ps.is_main and not 0 <= integrity.writer_rank(n) < ps.world_size)
    ]
    digests = integrity.digest_files(path, mine, mode)
    gathered = [None] * ps.world_size if ps.is_main else None
    dist.gather_object(digests, gathered, dst=0)
    if ps.is_main:
        files = {k: v for part in gathered for k, v in part.items()}
        missing = sorted(set(names) - set(files))
        if missing:  # listed by rank 0 but digested by nobody: a bug in writer_rank
            raise RuntimeError(f"integrity record of {path}: no rank digested {missing[:3]}")
        integrity.write_record(path, files, mode, payload=payload, entries=entries)


def _discard(path: Path) -> None:
    """Remove a partial checkpoint folder: rename it out of the ``step_*`` names at once, then
    delete (a straggler's file may survive in the renamed folder: never resumed, removed by
    the next save)."""
    trash = path.with_name(f".partial-{path.name}-{os.getpid()}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


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
    """Restore weights, optimizer, scheduler, RNG, data position and step from ``path``. An
    adapter checkpoint's base is loaded first (its adapters merged, if it has any); then the
    checkpoint's own entries, the adapters into the live ones."""
    check_resumable(path, ps.world_size)
    lora = peft_record.read_record(path)
    if lora is not None and lora["base"] is not None:
        load_weights(lora["base"], model)
    keep = lambda k: peft_record.holds(lora, k)  # noqa: E731
    sharded = _sharded_state(model, optimizer, ps, is_loading=True, path=path, keep=keep)
    loaded = dist_checkpointing.load(sharded, str(path))  # sharded entries + the common state
    load_model_state(model, loaded["model"], required=keep)
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
    keep = lambda k: k.startswith(prefix) and ".lora." not in k  # noqa: E731 (adapters: fresh)
    wanted = model_request(model, path, keep)
    if not wanted:
        raise ValueError(f"the model has no weights under {prefix}*")
    # load() returns the sharded entries asked for plus the checkpoint's common state
    loaded = dist_checkpointing.load({"model": wanted}, str(path))["model"]
    try:
        load_model_state(model, loaded, prefix, required=keep)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


@torch.no_grad()
def load_weights(path: str | os.PathLike, model, merge: bool = True) -> None:
    """Load model weights only (any parallel layout), e.g. from the previous stage.

    A checkpoint with LoRA adapters (:mod:`omni_train.checkpoint.peft`) loads as the weights
    it stands for: its base (recursively), its own entries, and its adapters merged into the
    base weights; ``model``'s own adapters (a LoRA stage) start fresh. ``merge=False`` loads
    its adapters into ``model``'s instead (built with the same ``peft``: the model the
    checkpoint's stage trained, e.g. to compare it with the reference's PEFT model)."""
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
    lora = peft_record.read_record(path)
    if lora is not None and lora["base"] is not None:
        load_weights(lora["base"], model)
    adapters = lora is not None and not merge

    def wanted(key: str) -> bool:  # the checkpoint's own entries (adapters: merged below)
        return peft_record.holds(lora, key) and (".lora." not in key or adapters)

    request = model_request(model, path, wanted)
    if adapters and not any(".lora." in k for k in request):
        raise ValueError(f"{path} holds LoRA adapters; load them into a model built with them")
    if request:  # an adapter checkpoint of a stage that trained nothing whole: nothing here
        loaded = dist_checkpointing.load({"model": request}, str(path))
        load_model_state(model, loaded["model"], required=wanted)
    if lora is not None and merge:
        merge_saved_adapters(
            model,
            PeftConfig(**lora["peft"]),
            lambda request: dist_checkpointing.load({"model": request}, str(path))["model"],
        )
