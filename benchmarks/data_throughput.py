"""Data-pipeline throughput per modality: energon loader + task encoder, 1 vs 2 workers.

For each synthetic category (one energon dataset each) it reads micro-batches through the same
path training uses (``EnergonBatches``: energon savable loader, ``OmniTaskEncoder``: chat
template, media decoding, normalisation) and reports samples/s and tokens/s. The baseline in
the same run is 1 decoding worker; the ratio column is 2 workers / 1 worker.

Media are planned with the *published* model's vision and audio settings by default (images
resized to 1,024-13,312 patches, frame budgets up to 1,024 patches), so pixel work is that of
production, not of the tiny test model; ``--model tiny`` measures the CI configuration.

    python benchmarks/data_throughput.py [--data runs/data/synthetic] [--batches 12]
        [--model nano_omni_30b_a3b] [--out benchmarks/results/data_throughput_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from omni_train.config import compose_job
from omni_train.data.loader import EnergonBatches
from omni_train.datatools.prepare import synthesize
from omni_train.datatools.synth_media import CATEGORIES


def measure(cfg, num_batches: int) -> tuple[float, float]:
    """(samples/s, tokens/s) over ``num_batches`` micro-batches after 2 warm-up batches."""
    data = EnergonBatches(cfg, dp_size=1, dp_rank=0, dp_group=None, device=torch.device("cpu"))
    for _ in range(2):  # worker start-up and first decodes
        next(data)
    data.end_step()
    start = time.perf_counter()
    for _ in range(num_batches):
        next(data)
    elapsed = time.perf_counter() - start
    data.end_step()
    return data.totals["num_samples"] / elapsed, data.totals["num_tokens"] / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="runs/data/synthetic")
    p.add_argument("--samples", type=int, default=64, help="per category, if synthesised")
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--model", default="nano_omni_30b_a3b")
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args()
    synthesize(args.data, args.samples, seed=0)  # a no-op when the data is already there
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for category in CATEGORIES:
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
                    ]
                )
                result[workers] = measure(cfg, args.batches)
            rows.append((category, result))
    lines = [
        f"Data throughput, model={args.model} media settings, micro-batch 2, "
        f"{args.batches} batches per cell ({platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__})",
        "",
        "| category | samples/s 1 worker | samples/s 2 workers | tokens/s 1 worker "
        "| tokens/s 2 workers | 2w / 1w |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for category, r in rows:
        (s1, t1), (s2, t2) = r[1], r[2]
        lines.append(
            f"| {category} | {s1:.1f} | {s2:.1f} | {t1:,.0f} | {t2:,.0f} | {s2 / s1:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(
            f"# Data throughput\n\nCommand: `python benchmarks/data_throughput.py "
            f"--model {args.model} --batches {args.batches}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
