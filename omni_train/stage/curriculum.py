"""``omni-train curriculum``: every stage of the curriculum in order, each a fresh torchrun job
(as each is its own job on a cluster), each starting from the previous stage's final weights.

    runs/<name>/stage0_vision_projector_warmup/   checkpoint + manifest.json
    runs/<name>/stage1_vision_sft_16k/            init_from: the stage-0 folder
    ...

The curriculum is the set of stage recipes with a ``stage.index``, linked by ``stage.previous``.
Every stage is composed and validated before the first one starts. A stage whose manifest says
``completed`` with the same config hash is skipped; an interrupted one resumes; ``--from``
deletes that stage's folder and every later one, and runs them again.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from omni_train.checkpoint import read_manifest
from omni_train.config import JobConfig, compose_job, config_hash, validate
from omni_train.config.compose import available
from omni_train.datatools import prepare
from omni_train.datatools.prepare import task_items
from omni_train.lifecycle import EXIT_INTERRUPTED
from omni_train.stage.launch import run_ranks
from omni_train.stage.report import write_report
from omni_train.training.metrics import GROUP_ENV, TOKENS_AFTER_ENV


class CurriculumInterruptedError(RuntimeError):
    """A stage stopped on a signal (with a checkpoint): the curriculum stops there."""


class CurriculumStageError(RuntimeError):
    """A stage failed (its summary is printed): the curriculum stops there."""


@dataclass
class PlannedStage:
    cfg: JobConfig
    overrides: list[str]  # what the stage's torchrun gets
    output_dir: Path
    action: str  # "run" (fresh), "resume", "skip" (completed), "rerun" (--from)

    @property
    def name(self) -> str:
        return self.cfg.stage.name


def _compose(name: str, overrides: list[str], out: Path, prev: Path | None) -> list[str]:
    args = [f"stage={name}", *overrides, f"checkpoint.output_dir={out}"]
    return args + ([f"checkpoint.init_from={prev}"] if prev is not None else [])


def stage_names(overrides: list[str]) -> list[str]:
    """The curriculum's stage recipes in order (checked: indices 0..n-1, each ``previous`` is
    the stage before it)."""
    indexed = {}
    for name in available("stage"):
        index = compose_job([f"stage={name}", *overrides]).stage.index
        if index is not None:
            if index in indexed:
                raise ValueError(f"stages {indexed[index]} and {name} both have index {index}")
            indexed[index] = name
    if sorted(indexed) != list(range(len(indexed))) or not indexed:
        raise ValueError(f"curriculum stage indices {sorted(indexed)} are not 0..n-1")
    return [indexed[i] for i in range(len(indexed))]


def _resolve_from(names: list[str], spec: str | None) -> int | None:
    if spec is None:
        return None
    for i, name in enumerate(names):
        if spec in (name, str(i), f"stage{i}"):
            return i
    raise ValueError(f"--from {spec!r} is not a curriculum stage; valid: {', '.join(names)}")


ANSWERS = "answers=learn"  # recipes/answers/learn.yaml


def with_defaults(overrides: list[str]) -> list[str]:
    """The command's defaults: ``model=tiny`` (the CPU overlay) unless a model is chosen, and
    for the tiny model ``parallel=dp`` unless a layout is chosen (recipes/parallel/dp.yaml:
    2.5x faster than the published TP 2 + SP on 2 CPU cores)."""
    if not any(o.split("=", 1)[0] == "model" for o in overrides):
        overrides = ["model=tiny", *overrides]
    tiny = "model=tiny" in overrides
    if tiny and not any(o.lstrip("+~").startswith(("parallel=", "parallel.")) for o in overrides):
        overrides = [*overrides, "parallel=dp"]
    return overrides


def with_answers(overrides: list[str], first_stage: str) -> list[str]:
    """``overrides`` plus :data:`ANSWERS` when the stages train on learnability data (the tiny
    overlay's ``data.synthetic_flavour=learn``, its root still to be made or holding the tasks)
    and no ``answers=`` choice is given: every stage then scores its answers at its end."""
    if any(o.split("=", 1)[0].lstrip("+~") == "answers" for o in overrides):
        return overrides
    data = compose_job([f"stage={first_stage}", *overrides]).data
    root = data.synthetic_root
    if data.synthetic_flavour != "learn" or not root:
        return overrides
    if Path(root).exists() and not task_items(root):
        print(f"omni-train curriculum: no answer metrics: {root} holds no learnability tasks "
              "(general synthetic data?)", flush=True)  # fmt: skip
        return overrides
    return [*overrides, ANSWERS]


def plan(
    run_dir: Path, overrides: list[str], world_size: int, from_stage: str | None = None
) -> list[PlannedStage]:
    """Compose, validate and decide every stage's action; nothing is written or deleted."""
    names = stage_names(overrides)
    overrides = with_answers(overrides, names[0])
    start = _resolve_from(names, from_stage)
    stages: list[PlannedStage] = []
    prev: Path | None = None
    for i, name in enumerate(names):
        out = run_dir / name
        args = _compose(name, overrides, out, prev)
        cfg = compose_job(args)
        expected = names[i - 1] if i else None
        if cfg.stage.previous != expected:
            raise ValueError(
                f"stage {name} declares previous={cfg.stage.previous}, but the curriculum "
                f"order puts {expected} before it"
            )
        action = "run"
        if start is not None and i >= start:
            action = "rerun" if out.exists() else "run"
        elif (out / "manifest.json").is_file():
            manifest = read_manifest(out)
            if manifest.get("status") == "completed":
                if manifest.get("config_hash") != config_hash(cfg):
                    raise ValueError(
                        f"{out} completed with a different config (hash "
                        f"{manifest.get('config_hash')}, now {config_hash(cfg)}); re-run it "
                        f"and what follows with --from {name}, or use another --name"
                    )
                action = "skip"
            else:
                action = "resume"
        stages.append(PlannedStage(cfg, args, out, action))
        prev = out
    for stage in stages:
        _ensure_synthetic(stage.cfg)
        validate(stage.cfg, world_size)
    return stages


def _ensure_synthetic(cfg: JobConfig) -> None:
    """The tiny curriculum's synthetic datasets, made once (deterministic: seed 0)."""
    root = cfg.data.synthetic_root
    if cfg.data.kind == "energon" and root and not Path(root).exists():
        flavour = cfg.data.synthetic_flavour
        print(f"omni-train curriculum: writing {flavour} synthetic data to {root}", flush=True)
        prepare.synthesize(root, prepare.DEFAULT_SAMPLES[flavour], 0, flavour=flavour)


def run(
    run_dir: Path,
    overrides: list[str],
    nproc: int,
    from_stage: str | None = None,
) -> list[dict]:
    """Run the curriculum; returns each stage's manifest (in order). A stage whose recipe sets
    ``trainer.eval_answers`` scores its weights at its end, in its own job (``answers`` in its
    manifest; :func:`with_answers` adds that on learnability data), and the summary
    shows the accuracy per task after every such stage."""
    stages = plan(run_dir, overrides, nproc, from_stage)
    for stage in stages:
        if stage.action == "rerun":
            shutil.rmtree(stage.output_dir)
    os.environ[GROUP_ENV] = run_dir.name  # wandb groups the stages' runs by curriculum
    for i, stage in enumerate(stages):
        if stage.action == "skip":
            print(f"omni-train curriculum: {stage.name} completed earlier; skipped", flush=True)
            continue
        # the ETA to the curriculum's end: the later stages' tokens at this stage's rate
        later = sum(_stage_tokens(s.cfg) for s in stages[i + 1 :] if s.action != "skip")
        os.environ[TOKENS_AFTER_ENV] = str(later)
        print(f"omni-train curriculum: {stage.name} ({stage.action})", flush=True)
        started = time.time()
        code = run_ranks(stage.cfg, stage.overrides, nproc)
        if code == EXIT_INTERRUPTED:
            raise CurriculumInterruptedError(
                f"stage {stage.name} stopped on a signal with a checkpoint; run the same "
                "command again to resume it and go on"
            )
        if code != 0:  # the launcher's summary above says which rank, which step and why
            raise CurriculumStageError(
                f"stage {stage.name} failed (exit code {code}); run the same command again "
                "once it is fixed: completed stages are skipped"
            )
        print(f"omni-train curriculum: {stage.name} took {time.time() - started:.0f} s", flush=True)
    manifests = [read_manifest(s.output_dir) for s in stages]
    for m, s in zip(manifests, stages, strict=True):
        m["curriculum_action"] = s.action

    page = write_report(run_dir)
    print(f"omni-train curriculum: report {page}", flush=True)
    return manifests


def _stage_tokens(cfg: JobConfig) -> int:
    """Token positions a stage trains on (steps x global batch x context)."""
    t = cfg.trainer
    return t.train_steps * t.global_batch_size * t.seq_length
