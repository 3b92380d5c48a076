"""Packing benchmark: efficiency, data-parallel cost imbalance and throughput per stage.

For each stage, a length distribution is built from its mixture in the spec's data_blends.md
(category shares of samples, mean tokens per sample from the published token / sample counts;
lognormal spread sigma 0.8, clipped to [32, context]; image/video/audio token shares per
category are assumptions stated in MIXTURES). Four packers run on the same stream in the same
run:

- ``no packing``: micro-batches of samples in arrival order, padded to the longest, as many as
  fit ``context`` padded tokens (the memory of one packed sequence);
- ``first-fit decreasing``: each 1,000-sample buffer packed whole, bins dealt round-robin;
- ``greedy (no balance)``: best-fit decreasing (``pack``) per buffer, bins dealt round-robin;
- ``ours``: :class:`~omni_train.data.packing.OnlinePacker` (carry-over, cost-balanced rounds).

Efficiency = real tokens / (micro-batches x context); imbalance = per step (one bin per rank),
max / mean rank cost, averaged over steps; throughput = samples packed per second, one core.

Usage: python benchmarks/packing.py [--samples 20000] [--ranks 8] [--buffer 1000]
"""

from __future__ import annotations

import argparse
import math
import random
import time

from omni_train.data.packing import OnlinePacker, pack, sample_cost

# stage -> (context, [(category, share of samples, mean tokens, vision share, audio share)])
MIXTURES = {
    "stage 0": (16384, [("vision", 1.0, 1660, 0.7, 0.0)]),
    "stage 2": (16384, [("ASR", 1.0, 193, 0.0, 0.8)]),
    "stage 3": (
        16384,
        [
            ("ASR", 0.47, 200, 0.0, 0.8),
            ("sound", 0.25, 400, 0.0, 0.7),
            ("music", 0.08, 2200, 0.0, 0.8),
            ("speech", 0.20, 200, 0.0, 0.7),
        ],
    ),
    "stage 4": (
        16384,
        [
            ("vision", 0.48, 2100, 0.7, 0.0),
            ("text", 0.03, 3700, 0.0, 0.0),
            ("short video", 0.056, 4800, 0.8, 0.0),
            ("video omni", 0.008, 6400, 0.6, 0.25),
            ("ASR", 0.095, 220, 0.0, 0.8),
            ("audio reasoning", 0.025, 3300, 0.0, 0.5),
            ("audio", 0.305, 1040, 0.0, 0.7),
        ],
    ),
    "stage 5": (
        49152,
        [
            ("ASR", 0.107, 185, 0.0, 0.8),
            ("audio", 0.467, 1340, 0.0, 0.7),
            ("vision", 0.192, 2800, 0.7, 0.0),
            ("text", 0.017, 24000, 0.0, 0.0),
            ("video", 0.03, 20000, 0.8, 0.0),
            ("video reasoning", 0.027, 20500, 0.75, 0.0),
            ("omni", 0.117, 18500, 0.6, 0.25),
            ("omni reasoning", 0.033, 19900, 0.55, 0.2),
        ],
    ),
    "stage 6": (
        262144,
        [
            ("long documents", 0.815, 61000, 0.85, 0.0),
            ("text", 0.101, 40000, 0.0, 0.0),
            ("long text", 0.004, 230000, 0.0, 0.0),
            ("vision", 0.08, 2100, 0.7, 0.0),
        ],
    ),
}


def stream(stage: str, n: int, seed: int) -> tuple[int, list[tuple[int, float]]]:
    context, cats = MIXTURES[stage]
    rng = random.Random(seed)
    weights = [c[1] for c in cats]
    out = []
    for _ in range(n):
        _, _, mean, vis, aud = rng.choices(cats, weights)[0]
        sigma = 0.8
        mu = math.log(mean) - sigma * sigma / 2  # the lognormal's mean = mean
        length = min(context, max(32, int(rng.lognormvariate(mu, sigma))))
        out.append((length, sample_cost(length, int(length * vis), int(length * aud))))
    return context, out


def steps_imbalance(bin_costs: list[float], ranks: int) -> float:
    ratios = []
    for k in range(0, len(bin_costs) - ranks + 1, ranks):
        step = bin_costs[k : k + ranks]
        ratios.append(max(step) / (sum(step) / ranks))
    return sum(ratios) / len(ratios)


def no_packing(samples, context, ranks, buffer):
    bins, cur, longest = [], [], 0
    for i, (n, _) in enumerate(samples):
        if cur and (len(cur) + 1) * max(longest, n) > context:
            bins.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    return bins + [cur]


def first_fit_decreasing(samples, context, ranks, buffer):
    bins = []
    for start in range(0, len(samples), buffer):
        chunk = list(range(start, min(start + buffer, len(samples))))
        order = sorted(chunk, key=lambda i: -samples[i][0])
        local, fill = [], []
        for i in order:
            for b, f in enumerate(fill):
                if f + samples[i][0] <= context:
                    local[b].append(i)
                    fill[b] += samples[i][0]
                    break
            else:
                local.append([i])
                fill.append(samples[i][0])
        bins += local
    return bins


def greedy(samples, context, ranks, buffer):
    bins = []
    for start in range(0, len(samples), buffer):
        chunk = list(range(start, min(start + buffer, len(samples))))
        bins += [[chunk[j] for j in b] for b in pack([samples[i][0] for i in chunk], context)]
    return bins


def ours(samples, context, ranks, buffer):
    packer, bins, it = OnlinePacker(context, ranks), [], iter(range(len(samples)))
    ids: dict[int, int] = {}
    while True:
        if packer.needs_samples():
            for i in it:
                ids[packer.add(samples[i][0], samples[i][1])] = i
                if len(packer) >= buffer:
                    break
            if not len(packer):
                return bins
            packer.repack()
        bins += [[ids.pop(s) for s in b] for b in packer.next_round()]


PACKERS = {
    "no packing": no_packing,
    "first-fit decreasing": first_fit_decreasing,
    "greedy (no balance)": greedy,
    "ours": ours,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--buffer", type=int, default=1000)
    parser.add_argument("--stages", nargs="*", default=list(MIXTURES))
    args = parser.parse_args()
    print(
        f"{args.samples} samples per stage, {args.ranks} data-parallel ranks, buffer "
        f"{args.buffer}; efficiency = real tokens / capacity, imbalance = max/mean rank cost"
    )
    header = "| stage | context | packer | efficiency | imbalance | samples/s | vs no packing |"
    print(header + "\n|---|---|---|---|---|---|---|")
    for stage in args.stages:
        context, samples = stream(stage, args.samples, seed=0)
        base = None
        for name, fn in PACKERS.items():
            start = time.perf_counter()
            bins = fn(samples, context, args.ranks, args.buffer)
            rate = len(samples) / (time.perf_counter() - start)
            bins = [b for b in bins if b]
            assert sorted(i for b in bins for i in b) == list(range(len(samples)))
            real = sum(samples[i][0] for b in bins for i in b)
            eff = real / (len(bins) * context)
            costs = [sum(samples[i][1] for i in b) for b in bins]
            imb = steps_imbalance(costs[: len(costs) * 9 // 10], args.ranks)  # not the drain
            base = base or eff
            print(
                f"| {stage} | {context} | {name} | {eff:.2%} | {imb:.3f} | {rate:,.0f} | "
                f"{eff / base:.2f}x |"
            )


if __name__ == "__main__":
    main()
