"""``omni-train run --dry-run``: resolve a stage's full-scale layout without GPUs.

One process plays one rank (default 0) of the stage's cluster: a fake process group of the
cluster's world size (``torch.distributed``'s ``fake`` backend: collectives are no-ops), megatron
-core's real ``initialize_model_parallel`` for the layout, and the real model built with its
parameters on the meta device (no weight memory), frozen per the stage. It reports the group
sizes megatron resolved and this rank's memory for parameters, gradients and optimizer state:

* parameters: this rank's shards (TP, EP) in the training dtype;
* gradients: megatron DDP's gradient buffer (fp32, ``grad_reduce_in_fp32``), trainable only;
* optimizer: AdamW's two fp32 moments, plus an fp32 master copy under bf16, trainable only,
  sharded over the data-parallel group by the distributed optimizer (dense parameters over
  DP x CP, expert parameters over the expert data-parallel group).

Activations are not estimated here; ``omni-train plan`` (:mod:`omni_train.plan.planner`) adds
them from measured per-layer costs. Runs on the CPU platform
so a laptop or login node can check a 512-GPU layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from omni_train.config import compose_job, validate
from omni_train.log import install_filters
from omni_train.model.build import build_omni_model
from omni_train.model.freeze import apply_freezing
from omni_train.model.lora import apply_lora
from omni_train.model.meta import parameters_on_meta
from omni_train.model.specs import platform_leaves
from omni_train.parallel.state import init_model_parallel
from omni_train.platform import setup

GIB = 1024**3


def _init_fake_world(world_size: int, rank: int) -> None:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


def resolve(overrides: list[str], world_size: int | None = None, rank: int = 0) -> dict:
    """The layout and per-rank memory of the composed stage (see module doc). ``world_size``:
    for a cluster without a fixed size (``cluster=local``); a sized cluster's own wins."""
    os.environ.setdefault("OMNI_TRAIN_PLATFORM", "cpu")
    from megatron.core import parallel_state as mpu

    cfg = compose_job(overrides)
    world = cfg.cluster.world_size or world_size
    if world is None:
        raise ValueError(
            f"cluster {cfg.cluster.name} has no fixed size; give the dry run --nproc-per-node "
            "and --nnodes (or choose a cluster=...)"
        )
    if not 0 <= rank < world:
        raise ValueError(f"--rank {rank} is outside the world of {world} ranks")
    validate(cfg, world, data=False)  # the layout needs no dataset on this machine
    platform = setup()
    p = cfg.parallel
    _init_fake_world(world, rank)
    try:
        ps = init_model_parallel(p, cfg.trainer.seed, gloo_groups=False)
        groups = {
            "world": world,
            "tp": mpu.get_tensor_model_parallel_world_size(),
            "cp": mpu.get_context_parallel_world_size(),
            "dp": mpu.get_data_parallel_world_size(),
            "dp_x_cp": mpu.get_data_parallel_world_size(with_context_parallel=True),
            "pp": mpu.get_pipeline_model_parallel_world_size(),
            "ep": mpu.get_expert_model_parallel_world_size(),
            "etp": mpu.get_expert_tensor_parallel_world_size(),
            "expert_dp": mpu.get_expert_data_parallel_world_size(),
        }
        with parameters_on_meta():
            model, _ = build_omni_model(cfg, ps, platform, platform_leaves(platform), init=False)
        apply_freezing(model.components(), cfg.stage.trainable)
        if cfg.peft.enabled:  # adapters (trainable) beside frozen bases, as the stage builds them
            apply_lora(model, cfg.peft, cfg.stage.trainable, cfg.trainer.seed)
    finally:
        mpu.destroy_model_parallel()
        import torch.distributed as dist

        dist.destroy_process_group()
    return {
        "stage": cfg.stage.name,
        "model": cfg.model.name,
        "cluster": {
            "name": cfg.cluster.name,
            "nodes": cfg.cluster.nodes,
            "gpus_per_node": cfg.cluster.gpus_per_node,
        },
        "rank": rank,
        "groups": groups,
        "sequence_parallel": p.sp,
        "distributed_optimizer": p.distributed_optimizer,
        "precision": cfg.trainer.precision,
        "memory": _memory(model, cfg, groups),
    }


def _memory(model, cfg, groups: dict) -> dict:
    """Per-component element counts of this rank and the bytes they take (see module doc)."""
    bf16 = cfg.trainer.precision == "bf16"
    param_bytes = 2 if bf16 else 4
    opt_bytes = 12 if bf16 else 8  # (master +) exp_avg + exp_avg_sq, fp32
    dist_opt = cfg.parallel.distributed_optimizer
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, param in model.named_parameters():
        comp = name.split(".", 1)[0]
        expert = not getattr(param, "allreduce", True)  # megatron marks expert parameters
        n = param.numel()
        counts[comp]["params"] += n
        if param.requires_grad:
            counts[comp]["trainable"] += n
            shard = (groups["expert_dp"] if expert else groups["dp_x_cp"]) if dist_opt else 1
            counts[comp]["optimizer_bytes"] += n * opt_bytes / shard
    rows = {}
    for comp, c in counts.items():
        rows[comp] = {
            "params": c["params"],
            "trainable": c["trainable"],
            "param_gib": c["params"] * param_bytes / GIB,
            "grad_gib": c["trainable"] * 4 / GIB,
            "optimizer_gib": c["optimizer_bytes"] / GIB,
        }
    total = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    total["total_gib"] = total["param_gib"] + total["grad_gib"] + total["optimizer_gib"]
    return {"components": rows, "total": total}


def format_report(r: dict) -> str:
    g, c = r["groups"], r["cluster"]
    nodes = f"{c['nodes']} nodes x {c['gpus_per_node']} GPUs = " if c["nodes"] else ""
    lines = [
        f"stage {r['stage']}  model {r['model']}  cluster {c['name']}  (rank {r['rank']} shown)",
        f"layout: {nodes}{g['world']} ranks = TP {g['tp']} x CP {g['cp']} x DP {g['dp']}"
        f" (x PP {g['pp']});  experts: EP {g['ep']} x ETP {g['etp']} x expert-DP "
        f"{g['expert_dp']};  SP {'on' if r['sequence_parallel'] else 'off'}, "
        f"distributed optimizer {'on' if r['distributed_optimizer'] else 'off'}, "
        f"{r['precision']}",
        "",
        f"{'component':<18}{'params/rank':>16}{'trainable':>16}{'params GiB':>12}"
        f"{'grads GiB':>11}{'optim GiB':>11}",
    ]
    rows = [*r["memory"]["components"].items(), ("total", r["memory"]["total"])]
    for name, m in rows:
        lines.append(
            f"{name:<18}{m['params']:>16,}{m['trainable']:>16,}{m['param_gib']:>12.2f}"
            f"{m['grad_gib']:>11.2f}{m['optimizer_gib']:>11.2f}"
        )
    lines.append(
        f"per-rank parameters + gradients + optimizer: {r['memory']['total']['total_gib']:.2f} "
        "GiB (activations not included)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    install_filters()  # an entry point: see omni_train.log.QUIET
    parser = argparse.ArgumentParser(prog="omni-train run --dry-run")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        report = resolve(overrides, args.world_size, args.rank)
    except ValueError as e:
        print(f"omni-train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
