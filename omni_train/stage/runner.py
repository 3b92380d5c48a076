"""Run one stage: platform -> parallel state -> model (+freeze) -> data -> train -> checkpoint.

Start-up decides between four cases, in this order:
1. resume: ``output_dir`` has an intact checkpoint and ``checkpoint.resume`` allows it ->
   restore everything of that run and continue (:mod:`omni_train.stage.resume`: damaged
   checkpoints, a missing ``latest``, starting over);
2. handoff: ``checkpoint.init_from`` is set -> the previous stage's final weights only (after
   the checks in :mod:`omni_train.stage.handoff`), fresh optimizer, step 0;
3. pretrained components: ``checkpoint.init_components`` -> those components' weights, the rest
   initialised (stage 0);
4. fresh: random initialisation.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

from omni_train import platform as omni_platform
from omni_train.checkpoint import versions, write_manifest
from omni_train.checkpoint.io import (
    CheckpointSpaceError,
    TrainState,
    check_resumable,
    check_space,
    expected_checkpoint,
    load_component_weights,
    load_for_resume,
    load_weights,
    save_checkpoint,
    space_needed,
)
from omni_train.checkpoint.lock import LockedError, OutputLock, held_by_launcher
from omni_train.checkpoint.manifest import mark_failed
from omni_train.checkpoint.peft import check_base_chain, make_record, read_record
from omni_train.config import JobConfig, blends, config_hash, to_dict, validate
from omni_train.config.validation import check_platform
from omni_train.data import NoUsableSampleError, SkipLimitError, StopDuringWaitError, build_data
from omni_train.lifecycle import StopRequest
from omni_train.log import add_rank_log, get_logger, human_bytes, log_traceback
from omni_train.model.assembly import build_model
from omni_train.parallel import ParallelState, destroy_parallel, init_parallel
from omni_train.parallel.state import world_size_from_env
from omni_train.stage import resume
from omni_train.stage.handoff import check_components, check_handoff
from omni_train.training.flops import FlopsPolicy
from omni_train.training.loop import evaluate, train
from omni_train.training.metrics import MetricsLogger
from omni_train.training.optimizer import build_optimizer, wrap_ddp

log = get_logger()


def start_decision(cfg: JobConfig, ps: ParallelState) -> tuple:
    """Where the weights come from: ``(resume checkpoint, handoff checkpoint, pretrained
    components, LoRA record)``, at most one of the first three set; the record
    (:mod:`omni_train.checkpoint.peft`) is None unless ``peft`` is on. Rank 0 decides
    (:mod:`omni_train.stage.resume`; verifying checkpoints reads them, which one rank does for
    all), acts on it under the lock (damaged checkpoints set aside, a start-over archived) and
    tells every rank, or every rank raises the same error."""
    answer, error = None, None
    if ps.is_main:
        try:
            decision = resume.decide(cfg)
            if decision.path is not None:
                check_resumable(decision.path, ps.world_size)
                decision.notes += resume.schedule_notes(cfg, Path(cfg.checkpoint.output_dir))
            for note in decision.notes:
                log.warning("%s", note)
            resume.act(cfg, decision)
            handoff = components = None
            if decision.path is None and cfg.checkpoint.init_from:
                handoff = check_handoff(cfg)
            elif decision.path is None:
                components = check_components(cfg)
            answer = (decision.path, handoff, components, _lora_record(cfg, decision.path, handoff))
        except ValueError as e:
            error = str(e)
    box = [answer, error]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ValueError(box[1])
    return box[0]


def _lora_record(cfg: JobConfig, resumed: Path | None, handoff: Path | None) -> dict | None:
    """What a LoRA stage's checkpoints record (its base: the handoff checkpoint; a resume: the
    resumed checkpoint's). A resume must keep the adapters' settings and base."""
    peft = to_dict(cfg)["peft"]
    if resumed is not None:
        saved = read_record(resumed)
        if (saved is not None) != cfg.peft.enabled or (saved and saved["peft"] != peft):
            was = saved["peft"] if saved else "no adapters"
            raise ValueError(
                f"cannot resume {resumed}: it was trained with peft={was}, this run has "
                f"peft={peft}. Resume with the same peft settings, or start a new run from its "
                f"weights with checkpoint.init_from={resumed} (adapters are merged on load)"
            )
        check_base_chain(resumed)
        return saved
    if not cfg.peft.enabled:
        return None
    return make_record(peft, [], handoff)  # "whole" once the model is built: _run


def _schedule(cfg, scheduler) -> dict:
    sd = scheduler.state_dict()
    keys = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")
    t = cfg.trainer
    return {"train_steps": t.train_steps, "global_batch_size": t.global_batch_size,
            **{k: sd[k] for k in keys}}  # fmt: skip


def _manifest(cfg, ps, built, state, evals, status, started, resumed_from, ckpt, scheduler):
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
        "evals": state.evals,  # every evaluation: step, loss, loss per modality, answers
        "answers": evals.get("answers"),  # the last evaluation's answer metrics, if any
        "metrics": state.metrics,  # every step's scalars (omni_train.training.metrics)
        "tokens": data.get("num_tokens", 0),  # real (unpadded) tokens trained on
        "data": {
            "kind": cfg.data.kind,
            "blend": cfg.data.blend,
            "datasets": _datasets(cfg),
            "num_samples": data.get("num_samples", 0),
            "num_read": data.get("num_read", data.get("num_samples", 0)),
            "skipped": data.get("skipped", {}),
            "num_skipped": sum(data.get("skipped", {}).values()),
            "eval_skipped": evals.get("skipped", {}),  # the last evaluation's, per reason
        },
        "parameters": {
            name: {"trainable": c.trainable, "frozen": c.frozen, "adapter": c.adapter}
            for name, c in built.counts.items()
        },
        "trainable_parameters": sum(c.trainable for c in built.counts.values()),
        "frozen_parameters": sum(c.frozen for c in built.counts.values()),
        # the LR schedule the run follows (the checkpoint's under on_schedule_change=keep)
        "schedule": _schedule(cfg, scheduler),
        "stop_reason": state.stop_reason,
        "wall_time_s": round(state.wall_time_s, 3),
        "job_time_s": round(time.time() - started, 3),
        "layout": {"world": ps.world_size, "tp": ps.tp, "cp": ps.cp, "dp": ps.dp, "ep": ps.ep},
        "init_from": cfg.checkpoint.init_from,
        "init_components": dict(cfg.checkpoint.init_components),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "checkpoint": str(ckpt) if ckpt else None,
        # LoRA: the settings, and the base the checkpoint's adapters stand on (null: it holds
        # the whole model)
        "peft": {
            **sections["peft"],
            "base": (read_record(ckpt) or {}).get("base") if ckpt else None,
        }
        if cfg.peft.enabled
        else None,  # fmt: skip
        "platform": omni_platform.detect().name,
        "platform_blocks": omni_platform.detect().describe(),  # what ran: TE or not, attention...
        "versions": versions(),
    }


def _datasets(cfg: JobConfig) -> list[str]:
    d = cfg.data
    if d.kind != "energon":
        return []
    return blends.stage_dataset_dirs(d.blend, d.paths, d.synthetic_root, d.path)


def _check_checkpoint_space(cfg: JobConfig, module, ps: ParallelState, lora) -> None:
    """Before the first step: room for one checkpoint of this model and layout, from its
    sharded state (the launcher's pre-flight only estimates it), and the failure reserve."""
    per_param = 12 if cfg.trainer.precision == "bf16" else 8  # fp32 main copy + 2 moments
    size, entries = expected_checkpoint(module, per_param, lora)
    need = space_needed(size, entries) + SpaceReserve.SIZE
    log.info("a checkpoint of this stage takes about %s", human_bytes(space_needed(size, entries)))
    try:
        check_space(Path(cfg.checkpoint.output_dir), need, ps, "one checkpoint of this stage")
    except CheckpointSpaceError as e:
        raise ValueError(f"{e}; free space or choose another checkpoint.output_dir") from None


def _mark_failed(out, error: str) -> None:
    """The manifest says ``failed`` with ``error`` (the rest of an existing one kept)."""
    try:
        mark_failed(out, error)
    except OSError as e:
        log.error("could not write the failed manifest to %s: %s", out, e)


def _str(path) -> str | None:
    return str(path) if path else None


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else repr(e)


class SpaceReserve:
    """A few MiB written into the output folder at start and freed just before a failed
    manifest is written: a save that fills the disk must not also keep the manifest from
    saying so (it would stay ``running``)."""

    SIZE = 16 * 1024 * 1024
    NAME = ".omni-train-reserve"

    def __init__(self, output_dir):
        self.path = None if output_dir is None else Path(output_dir) / self.NAME
        if self.path is not None:
            try:
                with self.path.open("wb") as f:
                    f.write(b"\0" * self.SIZE)  # written, not sparse: the blocks are taken
            except OSError:
                self.path.unlink(missing_ok=True)
                self.path = None

    def release(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class StageError(RuntimeError):
    """A stage that stopped on an error after it started training; its manifest says
    ``failed`` with the error. ``everywhere``: every rank raised it (print it once)."""

    def __init__(self, message: str, *, everywhere: bool):
        super().__init__(message)
        self.everywhere = everywhere


def _take_lock(cfg: JobConfig, ps: ParallelState) -> OutputLock | None:
    """Rank 0 takes the output folder's lock for the run, unless the launcher holds it for
    this run already; every rank raises the same error when another run holds it
    (collective)."""
    lock, error = None, None
    if ps.is_main and not held_by_launcher(cfg.checkpoint.output_dir):
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
    rank_log = add_rank_log(cfg.checkpoint.output_dir)
    if rank_log is not None:
        log.info("this rank's log: %s", rank_log)
    if cfg.peft.enabled:  # TE's linears have no LoRA adapters here: megatron-core's own
        os.environ[omni_platform.TE_SWITCH] = "off"
    platform = omni_platform.setup()
    log.info("%s", platform.describe())
    check_platform(cfg, platform)  # e.g. fp32 + packed + TE attention, before anything is built
    ps: ParallelState = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    stop = StopRequest().install()
    lock = None
    try:
        lock = _take_lock(cfg, ps)
        return _run(cfg, ps, platform, stop, started)
    except (StageError, ValueError):  # said in one line already (a config error: by rank 0)
        raise
    except Exception as e:  # before the loop: building the model, loading, the data
        message = f"start-up: {type(e).__name__}: {_one_line(e)}"
        log_traceback(f"stage {cfg.stage.name} failed at {message}")
        if ps.is_main and (lock is not None or held_by_launcher(cfg.checkpoint.output_dir)):
            _mark_failed(cfg.checkpoint.output_dir, message)
        raise StageError(message, everywhere=False) from e
    finally:
        if lock is not None:
            lock.release()
        destroy_parallel()


def _run(cfg, ps, platform, stop, started) -> dict:
    resumed_from, handoff, components, lora = start_decision(cfg, ps)
    log.info("stage %s on %s: %s", cfg.stage.name, platform.name, ps.describe())
    built = build_model(cfg, ps, platform)
    if lora is not None and resumed_from is None:  # trained whole: no adapter in it
        lora["whole"] = sorted(c for c in cfg.stage.trainable if not built.counts[c].adapter)
        if lora["base"] is None:
            log.info("LoRA without checkpoint.init_from: the base exists nowhere else, so each "
                     "checkpoint holds the whole model")  # fmt: skip
        else:
            log.info("LoRA: checkpoints hold the adapters and %s; the base: %s",
                     lora["whole"] or "nothing else", lora["base"])  # fmt: skip
    for name, c in built.counts.items():
        adapters = f"  (LoRA adapters {c.adapter})" if c.adapter else ""
        log.info("component %-16s trainable %12d  frozen %12d%s", name, c.trainable, c.frozen,
                 adapters)  # fmt: skip
    if handoff is not None:
        log.info("initialising weights from %s (weights only)", handoff)
        load_weights(handoff, built.module)
    for name, path in (components or {}).items():
        log.info("component %s: pretrained weights from %s", name, path)
        load_component_weights(path, built.module, name)
    model = wrap_ddp(cfg, built.module, built.tf_config)
    optimizer, scheduler = build_optimizer(cfg, model, built.tf_config)
    _check_checkpoint_space(cfg, built.module, ps, lora)
    train_data, eval_data = build_data(cfg, ps, platform.device, stop.pending)
    flops_policy = FlopsPolicy.from_config(cfg)

    state = TrainState()
    if resumed_from is not None:
        log.info("resuming from %s", resumed_from)
        state = load_for_resume(resumed_from, built.module, optimizer, scheduler, ps)
        train_data.load_state_dict(state.data, state.data_rank)
    evals: dict = {}
    logger = MetricsLogger(cfg, is_main=ps.is_main, first_step=state.step)
    score_answers = None
    if cfg.trainer.eval_answers.num_samples:
        # lazy: the held-out rows are read with the dataset tools (omni_train.datatools), which
        # a stage without answer metrics never imports (tests/test_data.py)
        from omni_train.inference import evaluate as answer_eval

        # read before the first step: a missing or empty answer set fails the stage here
        rows = answer_eval.heldout_rows(cfg)
        score_answers = lambda: answer_eval.answer_metrics(built.module, cfg, rows)  # noqa: E731

    def run_eval(when: str) -> None:
        loss, by_modality = evaluate(cfg, model, eval_data, flops_policy=flops_policy)
        evals[when] = loss
        evals["skipped"] = eval_data.take_skipped() if eval_data is not None else {}
        entry = {"step": state.step, "when": when, "loss": loss, **by_modality}
        answers = score_answers() if score_answers is not None else None
        if answers is not None:
            evals["answers"] = entry["answers"] = answers
        if loss is not None or answers is not None:
            state.evals.append(entry)
            logger.evaluation(state.step, loss, by_modality, answers)

    if cfg.trainer.eval_at_start:
        run_eval("start")

    out = cfg.checkpoint.output_dir
    last_ckpt = resumed_from
    reserve = SpaceReserve(out if ps.is_main else None)

    def save(s: TrainState) -> None:
        nonlocal last_ckpt
        s.data_rank = train_data.rank_state()  # between steps: nothing is in flight
        c = cfg.checkpoint
        last_ckpt = save_checkpoint(
            out, built.module, optimizer, scheduler, s, ps, c.keep_last, c.integrity, lora
        )
        log.info("saved %s", last_ckpt)
        if ps.is_main:
            write_manifest(
                out,
                _manifest(
                    cfg, ps, built, s, evals, "running", started, resumed_from, last_ckpt, scheduler
                ),
            )

    def failed(error: str) -> None:
        state.data = train_data.state_dict()
        if ps.is_main:
            m = _manifest(
                cfg, ps, built, state, evals, "failed", started, resumed_from, None, scheduler
            )
            reserve.release()  # room for this manifest even when the disk filled up
            try:
                write_manifest(out, {**m, "error": error, "checkpoint": _str(last_ckpt)})
            except OSError as e:
                log.error("could not write the failed manifest to %s: %s", out, e)

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
            flops_policy=flops_policy,
        )
        after_loop = True
        finished = state.step >= cfg.trainer.train_steps
        if not finished and state.stop_reason is None:
            state.stop_reason = "exit_after_steps"
        if finished:
            run_eval("end")
        if last_ckpt is None or last_ckpt.name != f"step_{state.step:07d}":
            save(state)
    except StopDuringWaitError as e:  # nothing of the step in progress is kept
        state.stop_reason = f"{e} (while waiting for data)"
        state.data = train_data.state_dict()
        finished = False
        log.warning("%s while waiting for data: stopped; the checkpoint to resume: %s", e,
                    last_ckpt or "none yet")  # fmt: skip
    except SkipLimitError as e:  # the step's collective check: every rank at once; a worker
        # that finds no usable sample: this rank (the others wait for it, then torchrun ends)
        failed(str(e))
        logger.close()
        raise StageError(str(e), everywhere=not isinstance(e, NoUsableSampleError)) from e
    except Exception as e:  # this rank's failure; the others are stopped by torchrun
        if after_loop:
            where = f"after step {state.step} (final evaluation or checkpoint)"
        else:
            keys = train_data.last_keys
            samples = f" in the micro-batch of samples {keys}" if keys else ""
            where = f"step {state.step + 1}{samples}"
        message = f"{where}: {type(e).__name__}: {_one_line(e)}"
        log_traceback(f"stage {cfg.stage.name} failed at {message}")
        failed(message)
        logger.close()
        raise StageError(message, everywhere=False) from e
    reserve.release()
    status = "completed" if finished else "interrupted"
    manifest = _manifest(
        cfg, ps, built, state, evals, status, started, resumed_from, last_ckpt, scheduler
    )
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
