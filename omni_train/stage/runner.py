"""Run one stage: platform -> parallel state -> model (+freeze) -> data -> train -> checkpoint.

Start-up decides between four cases, in this order:
1. resume: ``output_dir`` has a complete checkpoint and ``checkpoint.resume`` is auto/true ->
   restore everything of that run and continue;
2. handoff: ``checkpoint.init_from`` is set -> the previous stage's final weights only (after
   the checks in :mod:`omni_train.stage.handoff`), fresh optimizer, step 0;
3. pretrained components: ``checkpoint.init_components`` -> those components' weights, the rest
   initialised (stage 0);
4. fresh: random initialisation.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from omni_train import platform as omni_platform
from omni_train.checkpoint import (
    TrainState,
    check_resumable,
    find_latest,
    load_component_weights,
    load_for_resume,
    load_weights,
    save_checkpoint,
    versions,
    write_manifest,
)
from omni_train.checkpoint.lock import LockedError, OutputLock
from omni_train.config import JobConfig, config_hash, to_dict, validate
from omni_train.config.validation import check_platform
from omni_train.data import SkipLimitError, build_data
from omni_train.log import get_logger
from omni_train.model import build_model
from omni_train.parallel import ParallelState, destroy_parallel, init_parallel
from omni_train.parallel.state import world_size_from_env
from omni_train.stage.handoff import check_components, check_handoff
from omni_train.stage.lifecycle import StopRequest
from omni_train.training.loop import evaluate, train
from omni_train.training.metrics import MetricsLogger
from omni_train.training.optimizer import build_optimizer, wrap_ddp

log = get_logger()


def resume_point(cfg: JobConfig, world_size: int) -> Path | None:
    """The checkpoint to resume from, or None for a new run (raises on contradictions).

    Every rank reads ``output_dir``: it must be on a filesystem all nodes share.
    """
    latest = find_latest(cfg.checkpoint.output_dir)
    if cfg.checkpoint.resume == "true" and latest is None:
        raise ValueError(
            f"checkpoint.resume=true but {cfg.checkpoint.output_dir} holds no checkpoint; "
            "use resume=auto to start fresh when there is none"
        )
    if cfg.checkpoint.resume == "false" and latest is not None:
        raise ValueError(
            f"{cfg.checkpoint.output_dir} already holds {latest.name} and checkpoint.resume=false;"
            " set checkpoint.resume=auto to continue it or choose another checkpoint.output_dir"
        )
    if latest is not None:
        check_resumable(latest, world_size)
    return latest


def _manifest(cfg, ps, built, state, evals, status, started, resumed_from, ckpt) -> dict:
    data = state.data
    sections = to_dict(cfg)
    return {
        "stage": cfg.stage.name,
        "stage_index": cfg.stage.index,
        "previous": cfg.stage.previous,
        "status": status,
        "step": state.step,
        "train_steps": cfg.trainer.train_steps,
        "config_hash": config_hash(cfg),
        "model_fingerprint": config_hash(cfg, sections=("model",)),
        "model": sections["model"],
        "trainable": list(cfg.stage.trainable),
        "recompute": sections["recompute"],
        "losses": state.losses,
        "grad_norms": state.grad_norms,
        "final_loss": state.losses[-1] if state.losses else None,
        "eval_loss": evals.get("end"),
        "eval_loss_at_start": evals.get("start"),
        "evals": state.evals,  # every evaluation: step, loss and loss per modality
        "metrics": state.metrics,  # every step's scalars (omni_train.training.metrics)
        "tokens": data.get("num_tokens", 0),  # real (unpadded) tokens trained on
        "data": {
            "kind": cfg.data.kind,
            "blend": cfg.data.blend,
            "num_samples": data.get("num_samples", 0),
            "num_read": data.get("num_read", data.get("num_samples", 0)),
            "skipped": data.get("skipped", {}),
            "num_skipped": sum(data.get("skipped", {}).values()),
            "eval_skipped": evals.get("skipped", {}),  # the last evaluation's, per reason
        },
        "parameters": {
            name: {"trainable": c.trainable, "frozen": c.frozen} for name, c in built.counts.items()
        },
        "trainable_parameters": sum(c.trainable for c in built.counts.values()),
        "frozen_parameters": sum(c.frozen for c in built.counts.values()),
        "stop_reason": state.stop_reason,
        "wall_time_s": round(state.wall_time_s, 3),
        "job_time_s": round(time.time() - started, 3),
        "layout": {"world": ps.world_size, "tp": ps.tp, "cp": ps.cp, "dp": ps.dp, "ep": ps.ep},
        "init_from": cfg.checkpoint.init_from,
        "init_components": dict(cfg.checkpoint.init_components),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "checkpoint": str(ckpt) if ckpt else None,
        "platform": omni_platform.detect().name,
        "platform_blocks": omni_platform.detect().describe(),  # what ran: TE or not, attention...
        "versions": versions(),
    }


class StageError(RuntimeError):
    """A stage that stopped on an error after it started training; its manifest says
    ``failed`` with the error. ``everywhere``: every rank raised it (print it once)."""

    def __init__(self, message: str, *, everywhere: bool):
        super().__init__(message)
        self.everywhere = everywhere


def preflight(cfg: JobConfig, world_size: int) -> Path | None:
    """The start-up checks that need only the filesystem (resume, handoff, components): the
    launcher runs them before spawning ranks, each rank again before it builds anything.
    Returns the checkpoint a resume would load."""
    resumed_from = resume_point(cfg, world_size)
    if resumed_from is None and cfg.checkpoint.init_from:
        check_handoff(cfg)
    elif resumed_from is None:
        check_components(cfg)
    return resumed_from


def _take_lock(cfg: JobConfig, ps: ParallelState) -> OutputLock | None:
    """Rank 0 takes the output folder's lock for the run; every rank raises the same error
    when another run holds it (collective)."""
    lock, error = None, None
    if ps.is_main:
        try:
            lock = OutputLock(cfg.checkpoint.output_dir).acquire()
        except LockedError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise LockedError(box[0])
    return lock


def run_stage(cfg: JobConfig) -> dict:
    """Run (or resume) one stage; returns the manifest written to ``output_dir``."""
    started = time.time()
    world_size = world_size_from_env()
    validate(cfg, world_size)  # before any process group or model exists
    preflight(cfg, world_size)  # the read-only checks too; repeated under the lock
    platform = omni_platform.setup()
    log.info("%s", platform.describe())
    check_platform(cfg, platform)  # e.g. fp32 + packed + TE attention, before anything is built
    ps: ParallelState = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    stop = StopRequest().install()
    lock = None
    try:
        lock = _take_lock(cfg, ps)
        return _run(cfg, ps, platform, stop, started, world_size)
    finally:
        if lock is not None:
            lock.release()
        destroy_parallel()


def _run(cfg, ps, platform, stop, started, world_size) -> dict:
    resumed_from = resume_point(cfg, world_size)
    handoff = components = None
    if resumed_from is None and cfg.checkpoint.init_from:
        handoff = check_handoff(cfg)
    elif resumed_from is None:
        components = check_components(cfg)
    log.info("stage %s on %s: %s", cfg.stage.name, platform.name, ps.describe())
    built = build_model(cfg, ps, platform)
    for name, c in built.counts.items():
        log.info("component %-16s trainable %12d  frozen %12d", name, c.trainable, c.frozen)
    if handoff is not None:
        log.info("initialising weights from %s (weights only)", handoff)
        load_weights(handoff, built.module)
    for name, path in (components or {}).items():
        log.info("component %s: pretrained weights from %s", name, path)
        load_component_weights(path, built.module, name)
    model = wrap_ddp(cfg, built.module, built.tf_config)
    optimizer, scheduler = build_optimizer(cfg, model, built.tf_config)
    train_data, eval_data = build_data(cfg, ps, platform.device)

    state = TrainState()
    if resumed_from is not None:
        log.info("resuming from %s", resumed_from)
        state = load_for_resume(resumed_from, built.module, optimizer, scheduler, ps)
        train_data.load_state_dict(state.data, state.data_rank)
    evals: dict = {}
    logger = MetricsLogger(cfg, is_main=ps.is_main, first_step=state.step)

    def run_eval(when: str) -> None:
        loss, by_modality = evaluate(cfg, model, eval_data)
        evals[when] = loss
        take = getattr(eval_data, "take_skipped", None)
        evals["skipped"] = take() if take is not None else {}
        if loss is not None:
            state.evals.append({"step": state.step, "when": when, "loss": loss, **by_modality})
            logger.evaluation(state.step, loss, by_modality)

    if cfg.trainer.eval_at_start:
        run_eval("start")

    out = cfg.checkpoint.output_dir
    last_ckpt = resumed_from

    def save(s: TrainState) -> None:
        nonlocal last_ckpt
        s.data_rank = train_data.rank_state()  # between steps: nothing is in flight
        last_ckpt = save_checkpoint(
            out, built.module, optimizer, scheduler, s, ps, cfg.checkpoint.keep_last
        )
        log.info("saved %s", last_ckpt)
        if ps.is_main:
            write_manifest(
                out,
                _manifest(cfg, ps, built, s, evals, "running", started, resumed_from, last_ckpt),
            )

    def failed(error: str) -> None:
        state.data = train_data.state_dict()
        if ps.is_main:
            m = _manifest(cfg, ps, built, state, evals, "failed", started, resumed_from, None)
            write_manifest(out, {**m, "error": error})

    # The end-of-stage evaluation and the final save fail like a step does: a failed manifest
    # with the error, never one left "running".
    after_loop = False
    try:
        state = train(
            cfg,
            model,
            optimizer,
            scheduler,
            train_data,
            state,
            save,
            stop=lambda: stop.agreed(platform.device),
            logger=logger,
            on_eval=lambda s: run_eval("interval"),
        )
        after_loop = True
        finished = state.step >= cfg.trainer.train_steps
        if not finished and state.stop_reason is None:
            state.stop_reason = "exit_after_steps"
        if finished:
            run_eval("end")
        if last_ckpt is None or last_ckpt.name != f"step_{state.step:07d}":
            save(state)
    except SkipLimitError as e:  # raised on every rank at once (a collective check)
        failed(str(e))
        logger.close()
        raise StageError(str(e), everywhere=True) from e
    except Exception as e:  # this rank's failure; the others are stopped by torchrun
        if after_loop:
            where = f"after step {state.step} (final evaluation or checkpoint)"
        else:
            keys = getattr(train_data, "last_keys", None)
            samples = f" in the micro-batch of samples {keys}" if keys else ""
            where = f"step {state.step + 1}{samples}"
        message = f"{where}: {type(e).__name__}: {e}"
        failed(message)
        logger.close()
        log.exception("stage %s failed at %s", cfg.stage.name, message)
        raise StageError(message, everywhere=False) from e
    status = "completed" if finished else "interrupted"
    manifest = _manifest(cfg, ps, built, state, evals, status, started, resumed_from, last_ckpt)
    if ps.is_main:
        path = write_manifest(out, manifest)
        log.info(
            "stage %s %s: step %d/%d, final loss %s, eval loss %s%s -> %s",
            cfg.stage.name,
            status,
            state.step,
            cfg.trainer.train_steps,
            manifest["final_loss"],
            evals.get("end"),
            f" ({state.stop_reason})" if state.stop_reason else "",
            path,
        )
    logger.close()
    return manifest
