"""``omni-train probe``: how well a trained model answers the learnability tasks' held-out
questions (:mod:`omni_train.datatools.learn_tasks`), task by task.

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
the checkpoint is resharded on load. Off the training path: the curriculum calls it after
chosen stages (in a process of its own), the learnability benchmark after each run.

    omni-train probe CHECKPOINT --data ROOT [--json OUT] [overrides: model=tiny ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from omni_train import platform as omni_platform
from omni_train.checkpoint import check_model_fingerprint
from omni_train.checkpoint.io import load_weights
from omni_train.config import JobConfig, compose_job, config_hash
from omni_train.config.parallel import ParallelConfig
from omni_train.data.loader import task_encoder, to_device
from omni_train.data.task_encoder import cook_raw
from omni_train.datatools.learn_tasks import TASKS
from omni_train.datatools.prepare import task_items
from omni_train.log import install_filters
from omni_train.model.assembly import build_model
from omni_train.parallel import destroy_parallel, init_parallel


def answer_mask(labels: torch.Tensor, loss_mask: torch.Tensor, im_end: int) -> torch.Tensor:
    """[b, s] bool: positions whose label is an answer token (loss-bearing, not end-of-turn).
    A learnability sample has one assistant turn, so this is its answer."""
    return (loss_mask > 0) & (labels != im_end)


@torch.no_grad()
def score(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict[str, list]:
    """Per row of ``logits`` [b, s, V] (the whole vocabulary): whether every answer token is
    the argmax, the number of answer tokens right and in all, and their summed loss."""
    logits = logits.float()
    hit = (logits.argmax(-1) == labels) & mask
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), labels, reduction="none"
    )  # [b, s]
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        raise ValueError("a learnability sample without answer tokens")
    return {
        "exact": (hit.sum(1) == counts).tolist(),
        "right": hit.sum(1).tolist(),
        "tokens": counts.tolist(),
        "loss": (losses * mask).sum(1).tolist(),
    }


def evaluate_answers(
    model, cfg: JobConfig, root: str | Path, device: torch.device, batch_size: int = 16
) -> dict[str, dict]:
    """Score ``model`` (an :class:`~omni_train.model.omni.OmniModel`, world size 1) on every
    task's val samples under ``root``; {task: accuracy, token_accuracy, loss, num_samples,
    chance}."""
    encoder = task_encoder(cfg, training=False)
    im_end = encoder.tok.specials.im_end
    model.eval()
    results = {}
    for task, items in task_items(root).items():
        total: dict[str, list] = {"exact": [], "right": [], "tokens": [], "loss": []}
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            samples = [encoder.encode(cook_raw(k, m, c)) for k, m, c, _ in chunk]
            batch = to_device(encoder.batch(samples), device)
            logits = model(
                input_ids=batch.tokens,
                position_ids=batch.position_ids,
                attention_mask=None,
                media=batch.media,
            )
            rows = score(logits, batch.labels, answer_mask(batch.labels, batch.loss_mask, im_end))
            for name, values in rows.items():
                total[name] += values
        results[task] = {
            "accuracy": sum(total["exact"]) / len(items),
            "token_accuracy": sum(total["right"]) / sum(total["tokens"]),
            "loss": sum(total["loss"]) / sum(total["tokens"]),
            "num_samples": len(items),
            "chance": TASKS[task].chance,
        }
    return results


def probe_config(overrides: list[str]) -> JobConfig:
    """The stage's config (its overrides) at world size 1, unpacked: what the probe builds."""
    cfg = compose_job(overrides)
    data = dataclasses.replace(
        cfg.data, packing=dataclasses.replace(cfg.data.packing, enabled=False), num_workers=0
    )
    return dataclasses.replace(cfg, parallel=ParallelConfig(), data=data)


def probe(checkpoint: str | Path, root: str | Path, overrides: list[str]) -> dict[str, dict]:
    """Build the model of ``overrides`` (checked against the checkpoint's manifest), load the
    weights of ``checkpoint`` (a stage folder or one checkpoint) and score it."""
    cfg = probe_config(overrides)
    check_model_fingerprint(checkpoint, config_hash(cfg, sections=("model",)))
    if not task_items(root):
        raise ValueError(
            f"{root} holds no learnability task samples; make them with "
            f"omni-train data synth --flavour learn --out {root}"
        )
    platform = omni_platform.setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    try:
        built = build_model(cfg, ps, platform)
        load_weights(checkpoint, built.module)
        return evaluate_answers(built.module, cfg, root, platform.device)
    finally:
        destroy_parallel()


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
