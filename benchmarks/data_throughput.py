"""Data-pipeline throughput per modality: energon loader + task encoder, 1 vs 2 workers.

For each synthetic category (one energon dataset each) it reads micro-batches through the same
path training uses (``EnergonBatches``: energon savable loader, ``OmniTaskEncoder``: chat
template, media decoding, normalisation) and reports samples/s and tokens/s. The baseline in
the same run is 1 decoding worker; the ratio column is 2 workers / 1 worker.

Media are planned with the *published* model's vision and audio settings by default (images
resized to 1,024-13,312 patches, frame budgets up to 1,024 patches), so pixel work is that of
production, not of the tiny test model; ``--model tiny`` measures the CI configuration.

    python benchmarks/data_throughput.py [--data runs/data/synthetic] [--batches 12]
        [--model nano_omni_30b_a3b] [--layout processor] [--baseline GIT_REV]
        [--out benchmarks/results/data_throughput_cpu.md]

``--baseline REV`` also runs the benchmark of git revision REV (a temporary worktree, its own
code and script, the same data), first, and adds the ratio of this tree's samples/s to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from omni_train.config import compose_job
from omni_train.data.loader import EnergonBatches
from omni_train.datatools.prepare import synthesize
from omni_train.datatools.synth_media import CATEGORIES


def measure(cfg, num_batches: int) -> dict[str, float]:
    """``num_batches`` micro-batches read after 2 warm-up ones (worker start-up, the first
    buffer, the first decodes), counted over the measured ones only: ``samples``, real
    ``tokens``, ``wall_s`` and this process's ``cpu_s`` (all of the pipeline's CPU only with
    ``data.num_workers=0``). Also used by ``plan_cache.py``."""
    data = EnergonBatches(cfg, dp_size=1, dp_rank=0, dp_group=None, device=torch.device("cpu"))
    for _ in range(2):
        next(data)
    data.end_step()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(num_batches):
        next(data)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    step = data.end_step()
    return {"samples": step["samples"], "tokens": step["tokens"], "wall_s": wall, "cpu_s": cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="runs/data/synthetic")
    p.add_argument("--samples", type=int, default=64, help="per category, if synthesised")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--model", default="nano_omni_30b_a3b")
    p.add_argument("--layout", default="processor", help="data.layout")
    p.add_argument("--baseline", help="a git revision to measure first, for the ratio column")
    p.add_argument("--categories", nargs="*", default=list(CATEGORIES), help="default: all")
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args()
    synthesize(args.data, args.samples, seed=0)  # a no-op when the data is already there
    base = baseline(args) if args.baseline else None
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for category in args.categories:
            result = {}
            for workers in (1, 2):
                cfg = compose_job(
                    [
                        "stage=smoke_omni",
                        f"model={args.model}",
                        "data.blend=null",
                        "data.synthetic_root=null",
                        f"data.path={Path(args.data) / category}",
                        f"data.num_workers={workers}",
                        "trainer.micro_batch_size=2",
                        "trainer.global_batch_size=2",
                        "trainer.seq_length=65536",
                        f"checkpoint.output_dir={out}",
                        f"data.layout={args.layout}",
                    ]
                )
                m = measure(cfg, args.batches)
                result[workers] = (m["samples"] / m["wall_s"], m["tokens"] / m["wall_s"])
            rows.append((category, result))
    lines = [
        f"Data throughput, model={args.model} media settings, data.layout={args.layout}, "
        f"micro-batch 2, {args.batches} batches per cell ({platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__})",
        "",
        "| category | samples/s 1 worker | samples/s 2 workers | tokens/s 1 worker "
        "| tokens/s 2 workers | 2w / 1w |"
        + (" samples/s vs baseline 1w, 2w | tokens/s vs baseline 1w, 2w |" if base else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if base else ""),
    ]
    for category, r in rows:
        (s1, t1), (s2, t2) = r[1], r[2]
        line = f"| {category} | {s1:.1f} | {s2:.1f} | {t1:,.0f} | {t2:,.0f} | {s2 / s1:.2f}x |"
        if base:
            b1, b2, u1, u2 = base[category]
            line += f" {s1 / b1:.2f}x, {s2 / b2:.2f}x | {t1 / u1:.2f}x, {t2 / u2:.2f}x |"
        lines.append(line)
    if base:
        lines += ["", f"Baseline: revision {args.baseline}, samples/s and tokens/s (1, 2 workers):"]
        lines += [
            f"- {c}: {b[0]:.1f}, {b[1]:.1f}; {b[2]:,.0f}, {b[3]:,.0f}" for c, b in base.items()
        ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = f"--model {args.model} --batches {args.batches} --layout {args.layout}"
        if args.baseline:
            command += f" --baseline {args.baseline}"
        Path(args.out).write_text(
            f"# Data throughput\n\nCommand: `python benchmarks/data_throughput.py "
            f"{command}`\n\n{table}\n"
        )


def baseline(args) -> dict[str, tuple[float, float, float, float]]:
    """samples/s and tokens/s (1 worker, 2 workers) per category of revision
    ``args.baseline``, measured by its own script on the same data in a temporary worktree (a
    revision whose script has no ``--categories`` measures every category)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], check=True)
        try:
            cmd = [sys.executable, str(tree / "benchmarks/data_throughput.py")]
            cmd += ["--data", str(Path(args.data).resolve()), "--batches", str(args.batches)]
            cmd += ["--model", args.model]
            if "--categories" in (tree / "benchmarks/data_throughput.py").read_text():
                cmd += ["--categories", *args.categories]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"baseline run failed:\n{out.stderr[-3000:]}")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=True)
    num = r"([\d.,]+)"
    rows = re.findall(rf"^\| (\w+) \| {num} \| {num} \| {num} \| {num} \|", out.stdout, re.M)
    wanted = set(args.categories)
    return {
        c: tuple(float(x.replace(",", "")) for x in values) for c, *values in rows if c in wanted
    }


if __name__ == "__main__":
    main()
