"""Generation tokens/s with megatron-core's inference cache against recomputing the whole
prefix for each new token, same rows, same run (``omni_train.inference``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generate_cache.py [--new-tokens 32] \
        [--model tiny] [--out benchmarks/results/generate_cache_cpu.md]

The rows: text, an image, a video with its audio, an audio clip (prompts of 23 to 38 tokens),
the tiny omni model with random weights in fp32, greedy, a fixed number of new tokens (no stop
token). Three methods:

- ``cache, batch 4``: per-row prefill, merged cache, batched single-token decode (what
  ``omni-train generate --batch-size 4`` does);
- ``cache, batch 1``: the same, one row at a time;
- ``recompute``: one row at a time, every token runs the LM over the whole prefix. The prompt's
  embeddings (its media encoded) are made once per row, as the cache's prefill makes them once,
  so only the LM's recomputation differs.

Tokens/s counts generated tokens over the wall time of the whole generation (prefill
included). The greedy tokens of all three must be equal (checked).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny rows of tests/generate_probe.py

import torch  # noqa: E402
from generate_probe import rows  # noqa: E402

from omni_train.config import ParallelConfig  # noqa: E402
from omni_train.inference.generate import (  # noqa: E402
    generate_batch,
    generate_no_cache,
    generation_config,
)
from omni_train.inference.sampling import SamplingConfig, generator  # noqa: E402
from omni_train.log import install_filters  # noqa: E402
from omni_train.model.assembly import build_model  # noqa: E402
from omni_train.parallel.state import local_world  # noqa: E402
from omni_train.platform import setup  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    install_filters()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMNI_TRAIN_PLATFORM", "cpu")
    cfg = generation_config([f"model={args.model}", "trainer.precision=fp32"])
    plat = setup()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    with local_world(ParallelConfig(), plat, 0) as ps, torch.no_grad():
        model = build_model(cfg, ps, plat).module.eval()
        prompts, media = rows(cfg)
        n = len(prompts) * args.new_tokens
        generate_batch(model, prompts[:1], media[:1], sampling, generator(sampling))  # warm-up
        batched, t_batched = timed(
            lambda: generate_batch(model, prompts, media, sampling, generator(sampling))
        )
        single, t_single = timed(
            lambda: [
                generate_batch(model, [p], [m], sampling, generator(sampling))[0]
                for p, m in zip(prompts, media, strict=True)
            ]
        )
        recomputed, t_recompute = timed(
            lambda: generate_no_cache(model, prompts, media, sampling, generator(sampling))
        )
    if not batched == single == recomputed:
        raise SystemExit("the methods generated different tokens")
    lengths = ", ".join(str(int(p.shape[0])) for p in prompts)
    table = [
        "| method | rows | new tokens per row | wall s | tokens/s | x recompute |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in (
        ("cache, batch 4", t_batched),
        ("cache, batch 1", t_single),
        ("recompute the prefix", t_recompute),
    ):
        table.append(
            f"| {name} | {len(prompts)} | {args.new_tokens} | {t:.2f} | {n / t:.1f} | "
            f"{t_recompute / t:.2f} |"
        )
    text = "\n".join(
        [
            "# Generation: the inference cache against recomputing the prefix (CPU)",
            "",
            f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python "
            f"benchmarks/generate_cache.py {' '.join(sys.argv[1:])}`",
            "",
            f"Machine: {platform.node() or 'unknown'}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s). Model `{args.model}` (random weights, fp32), "
            f"greedy; prompts of {lengths} tokens (text, image, video + audio, audio). The "
            "tokens of all three methods are identical (checked in the run).",
            "",
            *table,
            "",
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
