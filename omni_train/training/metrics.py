"""Where a run's numbers go: the console, TensorBoard, wandb and the manifest (rank 0 only).

Every step the loop hands over one flat dict of scalars (names below); this module prints the
progress line every ``trainer.log_interval`` steps, writes every scalar to the enabled loggers
and keeps the dict for the manifest (``metrics``), so a plot, an event file and the manifest
show the same numbers. Evaluations add ``eval/*`` scalars.

Scalar names: ``train/loss``, ``train/loss/<modality>``, ``train/grad_norm``,
``train/lr/group<k>``, ``throughput/tokens_per_s``, ``throughput/samples_per_s``,
``throughput/tflops_per_gpu`` (model FLOPs), ``throughput/hw_tflops_per_gpu`` (with
recompute), ``throughput/mfu``, ``data/tokens`` (cumulative real tokens), ``data/padding``,
``data/wait_s``, ``data/skipped/<reason>``, ``memory/gib`` (GPU: max allocated; CPU: resident
set), ``time/step_s``, ``time/eta_stage_s``, ``time/eta_curriculum_s``; ``eval/loss``,
``eval/loss/<modality>``.

wandb runs offline unless ``WANDB_MODE`` says otherwise (``WANDB_MODE=online`` with
``WANDB_API_KEY``), grouped by curriculum (``OMNI_TRAIN_RUN_GROUP``, set by ``omni-train
curriculum``; else the stage's output folder) and named by stage.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path

from omni_train.log import get_logger

log = get_logger()

MODALITIES = ("text", "image", "video", "audio", "audio+video", "mixed")
# set by `omni-train curriculum` for its stage runs: tokens the later stages train on
TOKENS_AFTER_ENV = "OMNI_TRAIN_CURRICULUM_TOKENS_AFTER"
GROUP_ENV = "OMNI_TRAIN_RUN_GROUP"


def _clock(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(timedelta(seconds=int(seconds)))


class MetricsLogger:
    """One run's loggers (rank 0 writes; other ranks only keep the manifest list)."""

    def __init__(self, cfg, *, is_main: bool, first_step: int):
        self.cfg = cfg
        self.is_main = is_main
        self.started = time.monotonic()
        self.first_step = first_step
        self._times: list[float] = []
        self.tensorboard = self.wandb = None
        out = Path(cfg.checkpoint.output_dir)
        lg = cfg.logging
        if not is_main:
            return
        if lg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(lg.tensorboard_dir or str(out / "tensorboard"))
        if lg.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=lg.wandb_project,
                group=lg.wandb_group or os.environ.get(GROUP_ENV) or out.name,
                name=cfg.stage.name,
                dir=lg.wandb_dir or str(out),
                mode=os.environ.get("WANDB_MODE", "offline"),
                config={"stage": cfg.stage.name, "model": cfg.model.name},
                resume="allow",
                id=_wandb_id(out),
            )

    def eta(self, step: int, step_s: float, tokens_per_s: float) -> tuple[float, float | None]:
        """(seconds to the stage's end, to the curriculum's end or None)."""
        self._times.append(step_s)
        recent = self._times[1:][-20:] or self._times  # the first step includes warm-up
        stage = (self.cfg.trainer.train_steps - step) * sum(recent) / len(recent)
        after = os.environ.get(TOKENS_AFTER_ENV)
        if after is None or tokens_per_s <= 0:
            return stage, None
        return stage, stage + float(after) / tokens_per_s

    def step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_main:
            return
        t = self.cfg.trainer
        if step % t.log_interval == 0 or step == t.train_steps:
            log.info(self._line(step, scalars))
        self._write(step, scalars)

    def _line(self, step: int, s: dict[str, float]) -> str:
        t = self.cfg.trainer
        parts = [f"step {step}/{t.train_steps}", f"loss {s['train/loss']:.6f}"]
        grad = s.get("train/grad_norm")
        parts.append(f"grad_norm {grad:.4f}" if grad is not None and math.isfinite(grad) else
                     "grad_norm n/a")  # fmt: skip
        parts.append(f"lr {s['train/lr/group0']:.3e}")
        parts.append(f"tokens/s {s['throughput/tokens_per_s']:.0f}")
        tflops = s.get("throughput/tflops_per_gpu")
        if tflops is not None:
            parts.append(f"TFLOP/s/GPU {tflops:.3g}")
        if "throughput/mfu" in s:
            parts.append(f"MFU {100 * s['throughput/mfu']:.1f}%")
        parts.append(f"mem {s['memory/gib']:.2f} GiB")
        skipped = {k.split("/", 2)[2]: int(v) for k, v in s.items() if k.startswith("data/skip")}
        if skipped:
            parts.append(f"skipped {skipped}")
        elapsed = time.monotonic() - self.started
        eta = f"elapsed {_clock(elapsed)} ETA stage {_clock(s.get('time/eta_stage_s'))}"
        if "time/eta_curriculum_s" in s:
            eta += f" curriculum {_clock(s['time/eta_curriculum_s'])}"
        parts.append(eta)
        return " | ".join(parts)

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        finite = {k: v for k, v in scalars.items() if v is not None and math.isfinite(v)}
        if self.tensorboard is not None:
            for key, value in finite.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(finite, step=step)

    def evaluation(
        self,
        step: int,
        loss: float | None,
        by_modality: dict[str, float],
        answers: dict | None = None,
    ) -> dict:
        """Log an evaluation: the held-out loss (per modality), and ``answers`` (the answer
        metrics, omni_train.inference.evaluate's result) as ``eval/answers/<category>/<metric>``
        per (source, category) group and ``eval/answers/<metric>`` over all of them."""
        scalars = {} if loss is None else {"eval/loss": loss}
        scalars.update({f"eval/loss/{m}": v for m, v in by_modality.items()})
        if answers is not None:
            scalars.update(_answer_scalars(answers))
        if self.is_main and scalars:
            log.info("eval at step %d: loss %s %s", step, loss, by_modality or "")
            if answers is not None:
                log.info("answers at step %d: %s", step, _answer_line(answers))
            self._write(step, scalars)
        return scalars

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


ANSWER_SCALARS = ("loss", "exact", "generate_exact", "wer", "cer")


def _answer_scalars(answers: dict) -> dict[str, float]:
    out = {f"eval/answers/{k}": v for k, v in answers["total"].items() if k in ANSWER_SCALARS}
    for g in answers["groups"]:
        name = f"{g['source']}/{g['category']}"
        out.update({f"eval/answers/{name}/{k}": v for k, v in g.items() if k in ANSWER_SCALARS})
    return {k: v for k, v in out.items() if v is not None}


def _answer_line(answers: dict) -> str:
    """One line: each group's generation exact match (else teacher-forced exact) and rows."""
    key = "generate_exact" if "generate" in answers["metrics"] else "exact"
    cells = []
    for g in answers["groups"]:
        value = g.get(key)
        shown = "-" if value is None else f"{value:.0%}"
        cells.append(f"{g['category']} {shown} ({g['rows']})")
    total = answers["total"].get(key)
    return f"{key} " + ", ".join(cells) + (f"; all {total:.1%}" if total is not None else "")


def _wandb_id(out: Path) -> str:
    """A stable run id per output folder, so a resumed stage continues its wandb run."""
    import hashlib

    return hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
