"""``omni-train probe``: how well a trained model answers the learnability tasks' held-out
questions (:mod:`omni_train.datatools.learn_tasks`), task by task: ``omni-train eval``'s
teacher-forced metrics (:mod:`omni_train.inference.evaluate`) on a learnability root, grouped
by task, with each task's chance.

For every val sample of every task under a dataset root (``omni-train data synth --flavour
learn``), the model reads the sample as training does (the same task encoder: tokens, media,
labels) and is scored teacher-forced on the answer span, the assistant's tokens before its
end-of-turn token:

- ``accuracy``: the share of samples whose every answer token is the argmax of the logits at
  the position before it (an exact answer; a model that learned only the prior scores
  ``chance`` = 1 / classes, as the val split is class-balanced);
- ``token_accuracy``: the share of answer tokens that are the argmax (later tokens of a
  multi-token answer follow from the first, so this sits above ``accuracy``);
- ``loss``: mean cross-entropy over answer tokens.

It runs in one process (world size 1, unpacked rows) on the weights of any parallel layout:
the checkpoint is resharded on load. Off the training path: the learnability benchmark calls
it after each run; a stage scores itself while it trains with ``trainer.eval_answers``.

    omni-train probe CHECKPOINT --data ROOT [--json OUT] [overrides: model=tiny ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from omni_train.checkpoint import check_model_fingerprint
from omni_train.config import JobConfig, compose_job, config_hash
from omni_train.config.parallel import ParallelConfig
from omni_train.datatools.learn_tasks import TASKS
from omni_train.inference.evaluate import EvalRow, evaluate, read_eval_rows
from omni_train.inference.generate import generation_view, loaded_model
from omni_train.log import install_filters


def task_rows(root: str | Path) -> list[EvalRow]:
    """Every learnability task's val rows under ``root`` (tasks' folders in name order)."""
    folders = sorted({t.category for t in TASKS.values()})
    rows = [
        r
        for f in folders
        if (Path(root) / f).is_dir()
        for r in read_eval_rows(Path(root) / f, None)
    ]
    return [r for r in rows if r.category in TASKS]


def evaluate_answers(
    model, cfg: JobConfig, root: str | Path, device: torch.device, batch_size: int = 16
) -> dict[str, dict]:
    """Score ``model`` (an :class:`~omni_train.model.omni.OmniModel` in eval mode) on every
    task's val samples under ``root``; {task: accuracy, token_accuracy, loss, num_samples,
    chance}, tasks in :data:`TASKS` order."""
    rows = task_rows(root)
    if not rows:
        raise ValueError(
            f"{root} holds no learnability task samples; make them with "
            f"omni-train data synth --flavour learn --out {root}"
        )
    result, _ = evaluate(model, cfg, rows, ("loss", "exact"), batch_size=batch_size, device=device)
    groups = {g["category"]: g for g in result["groups"]}
    for g in groups.values():
        if g["failed"]:
            failed = g["failed"]
            raise ValueError(f"learnability rows of {g['category']} could not be read: {failed}")
    return {
        task: {
            "accuracy": groups[task]["exact"],
            "token_accuracy": groups[task]["token_accuracy"],
            "loss": groups[task]["loss"],
            "num_samples": groups[task]["rows"],
            "chance": spec.chance,
        }
        for task, spec in TASKS.items()
        if task in groups
    }


def probe_config(overrides: list[str]) -> JobConfig:
    """The stage's config (its overrides) at world size 1, as generation runs it (unpacked, no
    loader workers): what the probe builds."""
    cfg = compose_job(overrides)
    return generation_view(dataclasses.replace(cfg, parallel=ParallelConfig()))


def probe(checkpoint: str | Path, root: str | Path, overrides: list[str]) -> dict[str, dict]:
    """Build the model of ``overrides`` (checked against the checkpoint's manifest), load the
    weights of ``checkpoint`` (a stage folder or one checkpoint) and score it."""
    cfg = probe_config(overrides)
    check_model_fingerprint(checkpoint, config_hash(cfg, sections=("model",)))
    with loaded_model(cfg, checkpoint) as (model, _, device):
        return evaluate_answers(model, cfg, root, device)


def format_table(results: dict[str, dict]) -> str:
    lines = [f"{'task':18s} {'samples':>7s} {'chance':>6s} {'accuracy':>8s} {'tokens':>6s} "
             f"{'loss':>7s}"]  # fmt: skip
    for task, r in results.items():
        lines.append(
            f"{task:18s} {r['num_samples']:7d} {r['chance']:6.1%} {r['accuracy']:8.1%} "
            f"{r['token_accuracy']:6.1%} {r['loss']:7.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    install_filters()  # an entry point: see omni_train.log.QUIET
    parser = argparse.ArgumentParser(prog="omni-train probe", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a stage's output folder or one of its checkpoints")
    parser.add_argument("--data", required=True, help="a `data synth --flavour learn` root")
    parser.add_argument("--json", help="also write the results here")
    args, overrides = parser.parse_known_args(argv)
    results = probe(args.checkpoint, args.data, overrides)
    print(format_table(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
