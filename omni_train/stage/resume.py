"""Resume, start, or refuse: what a stage does with the run already in its output folder.

The launcher decides first (read-only, before torchrun starts: a refusal costs seconds), and
rank 0 of the stage decides again under the folder's lock and acts: it sets damaged checkpoints
aside (``damaged-step_N``) and, with ``checkpoint.start_over=true``, moves the previous run's
checkpoints and manifest to ``superseded-<UTC time>/``. Nothing here deletes anything.

Rules (``checkpoint.resume``):

* the newest *intact* checkpoint is resumed (``auto``, ``true``); a damaged newer one is
  named in one line and passed over; ``strict`` stops instead, naming it;
* a folder with checkpoints but no readable ``latest`` resumes from its newest intact step;
* a folder that holds a run but nothing intact (every checkpoint damaged, or a completed or
  interrupted manifest without checkpoints) is never started over silently: that takes
  ``checkpoint.start_over=true``;
* ``false`` refuses a folder with checkpoints (``start_over`` archives them instead).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from omni_train.checkpoint.layout import checkpoints_dir, resume_point, set_aside, step_dirs
from omni_train.checkpoint.manifest import MANIFEST

# manifest states that mean a run happened here whose work a fresh start would overwrite
_PRIOR = ("completed", "interrupted", "running", "failed")


@dataclass
class Decision:
    """``path``: the checkpoint to resume (None: start from step 0); ``notes``: one line each
    to log; ``set_aside``: damaged checkpoints to rename; ``archive``: start over, moving the
    previous run out of the way first."""

    path: Path | None = None
    notes: list[str] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)
    archive: bool = False


def _manifest_status(output_dir: Path) -> str | None:
    try:
        return json.loads((output_dir / MANIFEST).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def decide(cfg) -> Decision:
    """What the stage should do with ``checkpoint.output_dir`` (raises ``ValueError`` with
    the fix when it must not go on). Read-only."""
    c = cfg.checkpoint
    out = Path(c.output_dir)
    found = resume_point(out)
    status = _manifest_status(out)
    d = Decision(notes=list(found.notes))
    if c.start_over:
        if found.path or found.damaged or step_dirs(out) or status in _PRIOR:
            d.archive = True
            d.notes.append(
                f"checkpoint.start_over=true: the run in {out} (manifest: {status}, "
                f"{len(step_dirs(out))} checkpoints) moves to {out}/superseded-<time>/"
            )
        return d
    if found.damaged:
        newest, why = found.damaged[0]
        intact = f"{found.path.name}, the newest intact one" if found.path else None
        if c.resume == "strict":
            raise ValueError(
                f"checkpoint {newest} is damaged: {why}; checkpoint.resume=strict stops here. "
                + (f"Restore it, or resume from {found.path.name} (the newest intact one) with "
                   "checkpoint.resume=auto" if intact else
                   "Restore it, or set checkpoint.start_over=true")
            )  # fmt: skip
        for path, reason in found.damaged:
            d.notes.append(f"checkpoint {path.name} is damaged ({reason}); set aside as "
                           f"damaged-{path.name}")  # fmt: skip
        d.set_aside = [p for p, _ in found.damaged]
        if intact:
            d.notes.append(f"resuming from {intact}")
    if c.resume == "false" and (found.path or found.damaged):
        raise ValueError(
            f"{out} already holds checkpoints and checkpoint.resume=false; set "
            "checkpoint.resume=auto to continue that run, checkpoint.start_over=true to start "
            "over (the old run is kept in superseded-<time>/), or choose another "
            "checkpoint.output_dir"
        )
    if found.path is not None:
        d.path = found.path
        return d
    if c.resume in ("true", "strict"):
        raise ValueError(
            f"checkpoint.resume={c.resume} but {out} holds no intact checkpoint; use "
            "resume=auto to start fresh when there is none"
        )
    if found.damaged or status in ("completed", "interrupted"):
        what = "only damaged checkpoints" if found.damaged else f"a {status} run"
        raise ValueError(
            f"{out} holds {what} and no intact checkpoint to resume; starting this stage over "
            "would overwrite it: set checkpoint.start_over=true (the old run moves to "
            "superseded-<time>/) or choose another checkpoint.output_dir"
        )
    return d


def act(cfg, d: Decision) -> None:
    """Carry out a decision's renames (rank 0, holding the folder's lock)."""
    out = Path(cfg.checkpoint.output_dir)
    for path in d.set_aside:
        if path.exists():
            set_aside(path)
    if d.archive:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        target = out / f"superseded-{stamp}"
        n = 1
        while target.exists():
            target = out / f"superseded-{stamp}.{n}"
            n += 1
        target.mkdir()
        for name in (checkpoints_dir(out).name, MANIFEST):
            if (out / name).exists():
                os.replace(out / name, target / name)


# ---- the LR schedule of a resumed run --------------------------------------------------------


def schedule_of(cfg) -> dict:
    """The schedule a config asks for, in the terms of megatron's OptimizerParamScheduler
    (``omni_train.training.optimizer.build_optimizer``), plus the steps and the batch."""
    o, t = cfg.optimizer, cfg.trainer
    return {
        "train_steps": t.train_steps,
        "global_batch_size": t.global_batch_size,
        "max_lr": o.lr * o.lr_scale,
        "min_lr": o.min_lr * o.lr_scale,
        "lr_warmup_steps": int(round(o.warmup_fraction * t.train_steps)),
        "lr_decay_steps": t.train_steps,
        "lr_decay_style": o.decay_style,
    }


def schedule_changes(saved: dict, cfg) -> list[str]:
    """``name: saved -> now`` for every schedule setting that differs."""
    now = schedule_of(cfg)
    return [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]


def schedule_notes(cfg, out: Path) -> list[str]:
    """Compare the run's schedule (its manifest's) with this config's; by
    ``checkpoint.on_schedule_change``: refuse (raise), keep or rescale (a note saying so)."""
    try:
        saved = json.loads((out / MANIFEST).read_text()).get("schedule")
    except (OSError, ValueError, AttributeError):
        saved = None
    if not saved:
        return []  # a run from before manifests recorded it: nothing to compare
    changes = schedule_changes(saved, cfg)
    if not changes:
        return []
    what = ", ".join(changes)
    policy = cfg.checkpoint.on_schedule_change
    if policy == "refuse":
        raise ValueError(
            f"resuming {out} with a different schedule ({what}); set "
            "checkpoint.on_schedule_change=keep to continue the checkpoint's schedule (added "
            "steps at its final LR), =rescale to apply these settings from the current step on, "
            "or set them back"
        )
    if policy == "keep":
        return [f"schedule changed ({what}): the checkpoint's LR schedule continues "
                "(checkpoint.on_schedule_change=keep)"]  # fmt: skip
    return [f"schedule changed ({what}): the new LR schedule applies from the current step "
            "on (checkpoint.on_schedule_change=rescale)"]  # fmt: skip
