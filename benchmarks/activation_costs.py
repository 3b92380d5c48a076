"""Measure activation bytes per layer kind (``omni_train.plan.measure``) and print the fitted
table, with recompute's saving as the in-run comparison (recompute on / off, same kind).

    python benchmarks/activation_costs.py --model nano_omni_30b_a3b --tp 2 \
        --out benchmarks/results/activation_costs_cpu.md
    python benchmarks/activation_costs.py --table-only --out ...   # re-print committed files

The measured points go to ``omni_train/plan/activation_costs/<model>_tp<N>.json`` (the planner
reads them); the markdown lists every committed file's fits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_train.plan.costs import COSTS_DIR, QUADRATIC, ActivationCosts  # noqa: E402

SIZES = {  # the fit points: tokens, ViT patches per image, conformer frames per clip
    "nano_omni_30b_a3b": [
        "--lm-tokens",
        "1024,2048,4096",
        "--vit-patches",
        "1024,2048,4096",
        "--audio-frames",
        "125,250,375",
    ],  # fmt: skip
    "tiny": [
        "--lm-tokens",
        "128,256,512",
        "--vit-patches",
        "16,36,64",
        "--audio-frames",
        "25,50,75",
    ],  # fmt: skip
}
UNIT = {"vit_block": "patch", "vision_rest": "patch", "conformer_layer": "frame",
        "audio_rest": "frame"}  # fmt: skip


def run_measurement(model: str, tp: int, out: Path, groups: str | None = None) -> float:
    threads = str(max(1, os.cpu_count() // tp))
    env = dict(os.environ, OMNI_TRAIN_PLATFORM="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS=threads)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
           "-m", "omni_train.plan.measure", "--model", model, "--out", str(out),
           *SIZES.get(model, []), *(["--groups", groups] if groups else [])]  # fmt: skip
    start = time.time()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    return time.time() - start


def table(path: Path) -> list[str]:
    record = json.loads(path.read_text())
    costs = ActivationCosts(record, path)
    merged = "".join(
        f"; {m['groups']} measured separately in {m['seconds']} s" for m in record.get("merged", [])
    )
    lines = [
        f"### {record['model_name']} (architecture {record['model']}), TP {record['tp']}"
        f"{' + SP' if record['sequence_parallel'] else ''}, {record['precision']}, "
        f"measured on {record['platform']} (torch {record['torch']}) in {record['seconds']} s"
        f"{merged}",
        "",
        "| kind | setting | sizes | c0 (MiB) | per unit (KiB) | per unit² (B) | max fit error "
        "| recompute on / off | hooks per unit (KiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, by_key in record["points"].items():
        if kind.endswith("transient") or kind == "transient":
            continue
        for key, rows in by_key.items():
            fit = costs.saved(kind, key)
            sizes = ",".join(str(r[0]) for r in rows)
            err = max(abs(fit(r[0]) - r[1]) / max(abs(r[1]), 1) for r in rows)
            ratio = ""
            if key.startswith("rc=on"):
                off = key.replace("rc=on", "rc=off", 1)
                if off in by_key:
                    n = rows[-1][0]
                    base = costs.saved(kind, off)(n)
                    ratio = f"{fit(n) / base:.2f}" if base > 0 else ""
            q = f"{fit.c2:.3g}" if kind in QUADRATIC else "-"
            hooked = costs.hooked(kind, key)
            hooks = f"{hooked.c1 / 1024:.2f}" if hooked is not None else "-"
            lines.append(
                f"| {kind} per {UNIT.get(kind, 'token')} | {key} | {sizes} | {fit.c0 / 2**20:.2f}"
                f" | {fit.c1 / 1024:.2f} | {q} | {err:.1%} | {ratio} | {hooks} |"
            )
    lines += ["", "Transient peak above the saved set (forward + backward), per group:", ""]
    lines += ["| group | setting | size -> MiB |", "|---|---|---|"]
    for kind in ("transient", "vision_transient", "audio_transient"):
        for key, rows in record["points"].get(kind, {}).items():
            pts = ", ".join(f"{r[0]} -> {r[2] / 2**20:.1f}" for r in rows)
            lines.append(f"| {kind.replace('_transient', '') or 'lm'} | {key} | {pts} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="nano_omni_30b_a3b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="markdown of every committed file")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument(
        "--groups", default=None, help="with --merge: measure only these (e.g. mamba_kernel)"
    )
    parser.add_argument(
        "--merge", action="store_true", help="add the measured groups to the existing file"
    )
    args = parser.parse_args()
    if args.merge:
        target = COSTS_DIR / f"{args.model}_tp{args.tp}.json"
        part = target.with_suffix(".part.json")
        seconds = run_measurement(args.model, args.tp, part, args.groups)
        record, extra = json.loads(target.read_text()), json.loads(part.read_text())
        record["points"].update(extra["points"])
        # a group measured again replaces its earlier points and its earlier entry
        merged = [m for m in record.get("merged", []) if m["groups"] != args.groups]
        merged.append({"groups": args.groups, "seconds": extra["seconds"], "torch": extra["torch"]})
        record["merged"] = merged
        target.write_text(json.dumps(record, indent=1))
        part.unlink()
        print(f"measured {args.groups} in {seconds:.0f} s -> merged into {target}")
    elif not args.table_only:
        target = COSTS_DIR / f"{args.model}_tp{args.tp}.json"
        COSTS_DIR.mkdir(exist_ok=True)
        seconds = run_measurement(args.model, args.tp, target)
        print(f"measured {args.model} at TP {args.tp} in {seconds:.0f} s -> {target}")
    lines = [
        "# Activation memory per layer kind, measured on CPU",
        "",
        "Command: `python benchmarks/activation_costs.py --model MODEL --tp TP` (`make "
        "activation-costs`), on the CPU development machine (2 cores, bf16). How: "
        "`omni_train/plan/measure.py` (a dispatch mode that follows every tensor storage, over the "
        "real megatron-core / NeMo layers; a kind's cost is the difference of two models that "
        "differ by one layer of it). "
        "Saved bytes are per rank, fitted as c0 + c1 n (+ c2 n² for attention within an image or "
        "clip); *recompute on / off* is the fitted saved bytes with the component's recompute "
        "over those without it, at the largest measured size; *hooks per unit* is the same "
        "kind seen through autograd's saved-tensor hooks (each storage once), a cross-check: "
        "it misses the inputs torch's non-reentrant checkpoint holds (audio encoder and "
        "projector recompute), which the live count includes. Mamba figures come from "
        "omni-train's pure-PyTorch SSD scan (used wherever mamba-ssm is absent): an upper bound "
        "for mamba-ssm's fused kernel. The ViT's c2 is the CPU attention stand-in's [n, n] mask "
        "(the planner drops it for GPUs: TE's fused attention keeps none).",
        "",
    ]
    for path in sorted(COSTS_DIR.glob("*.json")):
        lines += table(path) + [""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
