"""The packed data pipeline with and without the plan cache (`data.packing.plan_cache_mib`).

For each learnability dataset (``omni-train data synth --flavour learn``: real media, and the
noise control whose media are larger and slower to decode), it reads packed micro-batches
through the path training uses (``EnergonBatches`` for ``stage=learn model=tiny``: energon,
planning, the online packer, decoding, ``pack_selected_samples``) with ``data.num_workers=0``,
so that all of the pipeline's work is done in this process and its CPU time
(``time.process_time``) can be read; CPU time, unlike wall time, barely moves when other jobs
share the machine. The baseline in the same run is ``plan_cache_mib=0``: every sample is read
and planned again by its restore key when its bin is due, as before the cache existed.

    python benchmarks/plan_cache.py [--data runs/learn/data] [--media real,noise]
        [--batches 20] [--out benchmarks/results/plan_cache_cpu.md]

The data is made first if it is missing (``--samples`` per task, as ``make learn`` makes it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from data_throughput import measure  # benchmarks/ is on sys.path when a script runs

from omni_train.config import compose_job
from omni_train.datatools import prepare
from omni_train.datatools.learn_tasks import TASKS

CACHE_MIB = (0, 256)  # baseline first, then the default


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("runs/learn/data"))
    p.add_argument("--media", default="real,noise", help="of real, noise")
    p.add_argument("--samples", type=int, default=1000, help="train samples per task, if made")
    p.add_argument("--batches", type=int, default=20, help="packed micro-batches per cell")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args()
    torch.set_num_threads(1)  # the decoding work of one data worker, not intra-op threads
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for media in args.media.split(","):
            root = args.data / media
            # a no-op when the data is there (the same arguments as benchmarks/learning.py)
            prepare.synthesize(root, args.samples, 0, flavour="learn", media=media,
                               tasks=list(TASKS))  # fmt: skip
            for name in ("image", "document", "video", "audio", "audio_video", "all"):
                path = root / (prepare.LEARN_METADATASET if name == "all" else name)
                cells = []
                for mib in CACHE_MIB:
                    cfg = compose_job(
                        [
                            "stage=learn",
                            "model=tiny",
                            f"data.path={path}",
                            "data.num_workers=0",
                            f"data.packing.plan_cache_mib={mib}",
                            f"checkpoint.output_dir={out}",
                        ]
                    )
                    m = measure(cfg, args.batches)
                    n = m["samples"]
                    cells.append((1000 * m["cpu_s"] / n, n / m["wall_s"], n))
                rows.append((media, name, cells))
                print(media, name, cells, flush=True)
    lines = [
        f"Packed data pipeline (`stage=learn model=tiny`, 1,024-token bins, one process, one "
        f"thread), {args.batches} micro-batches per cell after 2 warm-up ones "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}). Baseline: "
        "`plan_cache_mib=0` (each sample read and planned again when its bin is due).",
        "",
        "| media | dataset | samples | CPU ms/sample, no cache | CPU ms/sample, cache "
        "| CPU no cache / cache | samples/s no cache | samples/s cache |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for media, name, ((c0, s0, _), (c1, s1, n)) in rows:
        lines.append(
            f"| {media} | {name} | {n} | {c0:.2f} | {c1:.2f} | {c0 / c1:.2f}x | {s0:.0f} "
            f"| {s1:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = " ".join(["python benchmarks/plan_cache.py", *sys.argv[1:]])
        args.out.write_text(f"# Plan cache\n\nCommand: `{command}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
