"""Per-stage freezing and recompute equivalence on the tiny model, in real processes.

``freezing``: for every curriculum stage (tiny overlay, TP=2 + SP on 2 ranks): build the model,
DDP and the optimizer, train 2 steps on the stage's synthetic blend, then record per component
whether every tensor (parameters and buffers: BatchNorm statistics, MoE expert bias) is
bit-identical, plus what DDP and the optimizer hold and which modules are in eval mode.
``recompute``: one forward/backward of a mixed batch (every modality) with recompute=none and
with the recompute overrides given (default recompute=all), from the same weights; losses,
gradients and buffers compared exactly.

Usage: torchrun --nproc-per-node 2 tests/stage_probe.py MODE OUT SYNTH_ROOT [recompute overrides]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from omni_train.checkpoint.io import TrainState
from omni_train.config import compose_job
from omni_train.data import build_data
from omni_train.model.assembly import build_model
from omni_train.parallel.state import destroy_parallel, init_parallel
from omni_train.platform import setup
from omni_train.stage.curriculum import stage_names
from omni_train.training.flops import FlopsPolicy
from omni_train.training.loop import train
from omni_train.training.optimizer import build_optimizer, wrap_ddp


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def freezing(out: Path, synth: str) -> dict:
    result = {}
    ps = None
    platform = setup()
    for name in stage_names(["model=tiny"]):
        cfg = compose_job(
            [
                f"stage={name}",
                "model=tiny",
                "trainer.train_steps=2",
                f"data.synthetic_root={synth}",
                f"checkpoint.output_dir={out / name}",
            ]
        )
        if ps is None:  # every tiny stage has the same layout: one parallel state
            ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
        built = build_model(cfg, ps, platform)
        model = wrap_ddp(cfg, built.module, built.tf_config)
        optimizer, scheduler = build_optimizer(cfg, model, built.tf_config)
        train_data, _ = build_data(cfg, ps, platform.device)
        before = {c: snapshot(m) for c, m in built.components.items()}
        policy = FlopsPolicy.from_config(cfg)
        train(
            cfg,
            model,
            optimizer,
            scheduler,
            train_data,
            TrainState(),
            lambda s: None,
            flops_policy=policy,
        )
        trainable = [p for p in built.module.parameters() if p.requires_grad]
        in_ddp = {id(p) for b in model.buffers + model.expert_parallel_buffers for p in b.params}
        in_optimizer = sum(p.numel() for g in optimizer.optimizer.param_groups for p in g["params"])
        stage = {
            "trainable": cfg.stage.trainable,
            "unchanged": {},
            "changed_tensors": {},
            "ddp_params_are_trainable": in_ddp == {id(p) for p in trainable},
            "optimizer_numel": in_optimizer,
            "trainable_numel": sum(p.numel() for p in trainable),
            "frozen_with_grad": sum(
                1
                for p in built.module.parameters()
                if not p.requires_grad
                and (p.grad is not None or getattr(p, "main_grad", None) is not None)
            ),
            "eval_mode": sorted(c for c, m in built.components.items() if not m.training),
            "cpe_eval": bool(getattr(built.module.vision_encoder, "cpe_eval", False)),
        }
        for c, m in built.components.items():
            after = snapshot(m)
            same = [k for k in after if torch.equal(after[k], before[c][k])]
            stage["unchanged"][c] = len(same) == len(after)
            stage["changed_tensors"][c] = len(after) - len(same)
        result[name] = stage
        del train_data, model, optimizer, built
    destroy_parallel()
    return result


def recompute(out: Path, on: list[str]) -> dict:
    from omni_probe import mixed_batch  # tests/ is this script's folder

    common = [
        "stage=stage4_omni_sft_16k",
        "model=tiny",
        "stage.eval_parts=[]",
        "model.audio.dropout=0.1",  # RNG inside recomputed layers must replay exactly
    ]
    platform = setup()
    runs = {}
    weights = None
    ps = None
    for label, policy in (("none", ["recompute=none"]), ("on", on or ["recompute=all"])):
        cfg = compose_job([*common, *policy])
        if ps is None:
            ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
        model = build_model(cfg, ps, platform).module
        if weights is None:
            weights = snapshot(model)
        else:
            model.load_state_dict(weights, strict=False)
        model.train()
        x, y, media = mixed_batch(cfg)
        torch.manual_seed(7)  # same dropout / dither draws in both runs
        loss = model(input_ids=x, labels=y, media=media)
        loss.sum().backward()
        runs[label] = (
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            snapshot(model),
        )
    (l0, g0, b0), (l1, g1, b1) = runs["none"], runs["on"]
    result = {
        "loss_equal": torch.equal(l0, l1),
        "loss_max_diff": float((l0 - l1).abs().max()),
        "num_grads": len(g0),
        "grad_names_equal": g0.keys() == g1.keys(),
        "grads_differing": sorted(n for n in g0 if n in g1 and not torch.equal(g0[n], g1[n])),
        "grad_max_rel_diff": max(
            float((g0[n] - g1[n]).abs().max() / g0[n].abs().max().clamp(min=1e-30))
            for n in g0
            if n in g1
        ),
        "buffers_differing": sorted(k for k in b0 if not torch.equal(b0[k], b1[k])),
        "recomputed": {
            "lm_selective": cfg.recompute.lm,
            "vit_full": cfg.recompute.vision_encoder,
        },
    }
    destroy_parallel()
    return result


def main() -> None:
    mode, out, synth, *overrides = sys.argv[1:]
    out = Path(out)
    result = freezing(out, synth) if mode == "freezing" else recompute(out, overrides)
    if os.environ.get("RANK", "0") == "0":
        (out / f"{mode}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
