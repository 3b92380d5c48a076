"""Plan the seven full-scale stages with and without LoRA (``peft=lora``: rank 16 on the LM's
linears, the stage's other trainable components whole) and write the table: per-rank memory at
the published cluster, its gradients + optimizer part, the stage's time, and the fewest nodes
(1, 2, 4, ... with the stage's TP and CP, EP halved until it divides the world) each fits on.

    python benchmarks/plan_lora.py --out benchmarks/results/plan_lora.md

One CPU process, a few minutes: every plan and every node count is a dry run of the full model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMNI_TRAIN_PLATFORM", "cpu")
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _nodes(f: dict | None, published: int) -> str:
    if f is None:
        return f"{published} (published)"
    return f"{f['nodes']} (EP {f['ep']}, {f['total_gib']:.1f} GiB, {f['verdict']})"


def main() -> int:
    from omni_train.plan import planner
    from omni_train.stage.curriculum import stage_names

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.time()
    rows = []
    for s in stage_names([]):
        row = {"stage": s}
        for mode, extra in (("full", []), ("lora", ["peft=lora"])):
            overrides = [f"stage={s}", *extra]
            try:
                p = planner.plan(overrides)
            except ValueError as e:  # the LM frozen in this stage: nothing for its adapters
                row[mode] = {"error": str(e)}
                continue
            parts = p["memory"]["parts_gib"]
            row[mode] = {
                "peak": p["memory"]["total_gib"],
                "verdict": p["memory"]["verdict"],
                "grad_opt": parts["gradients"] + parts["optimizer"],
                "hours": p["time"].get("stage_hours"),
                "nodes": p["cluster"]["nodes"],
                "fewest": planner.fewest_nodes(overrides),
                "trainable": p["trainable"],
            }
        rows.append(row)
        print(s, {m: row[m].get("peak", row[m].get("error")) for m in ("full", "lora")}, flush=True)
    seconds = time.time() - start
    lines = [
        "# LoRA stages: memory, time and the fewest nodes",
        "",
        "Command: `python benchmarks/plan_lora.py --out benchmarks/results/plan_lora.md` (one "
        f"CPU process on the 2-core development machine, {seconds:.0f} s). Same figures: "
        "`omni-train plan stage=<stage> [peft=lora] --fewest-nodes`.",
        "",
        "*full*: the published stage; *LoRA*: the same with `peft=lora` (rank 16, alpha 32 on "
        "the LM's attention, Mamba, routed and shared expert linears; the LM's base frozen: no "
        "gradients or optimizer state for it; the stage's other trainable components, encoders "
        "and projectors, train whole as the recipe says). Memory as `plan_stages.md` (the dry "
        "run's weights, gradients and optimizer of the real model plus measured activations; "
        "backward still runs through the LM, so its activations stay). Time at the assumed "
        "30 % MFU, with the LM's weight gradients left out under LoRA. *Fewest nodes*: the "
        "smallest power of two below the published count on which the plan fits (TP and CP "
        "kept, EP halved until EP x expert TP divides the world; the global batch is then made "
        "of more micro-batches per rank, so a step takes proportionally longer). Nothing here "
        "ran on a GPU.",
        "",
        "| stage | trains | full: peak GiB | LoRA: peak GiB | full: grads + optimizer GiB | "
        "LoRA: grads + optimizer GiB | full: stage h | LoRA: stage h | full: fewest nodes | "
        "LoRA: fewest nodes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, lo = r["full"], r["lora"]
        if "error" in lo:
            lines.append(
                f"| {r['stage']} | {', '.join(f['trainable'])} | {f['peak']:.1f} "
                f"({f['verdict']}) | - | {f['grad_opt']:.2f} | - | {f['hours']:.1f} | - | "
                f"{_nodes(f['fewest'], f['nodes'])} | - (the LM is frozen here) |"
            )
            continue
        lines.append(
            f"| {r['stage']} | {', '.join(f['trainable'])} | {f['peak']:.1f} ({f['verdict']}) | "
            f"{lo['peak']:.1f} ({lo['verdict']}) | {f['grad_opt']:.2f} | {lo['grad_opt']:.2f} | "
            f"{f['hours']:.1f} | {lo['hours']:.1f} | {_nodes(f['fewest'], f['nodes'])} | "
            f"{_nodes(lo['fewest'], lo['nodes'])} |"
        )

    def fewest(m: dict) -> int:
        return (m["fewest"] or {}).get("nodes", m["nodes"])

    fewer = [r["stage"] for r in rows if "error" not in r["lora"]
             and fewest(r["lora"]) < fewest(r["full"])]  # fmt: skip
    lines += ["", "Stages that fit on fewer nodes with LoRA than without: "
              f"{', '.join(fewer) or 'none'}."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
