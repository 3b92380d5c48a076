"""CPU Mamba2 scan: the chunked SSD kernel against a step-by-step recurrence, in the same run.

    .venv/bin/python benchmarks/mamba_scan.py [--threads 1] [--out benchmarks/results/...]

Shapes follow one Mamba2 mixer of the published LM on one tensor-parallel rank of 2 (32 heads x
64, state 128, 4 groups, chunk 128); batch 1. The baseline is the plain recurrence
``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` in fp32, one step at a
time (what a straightforward CPU port would do). Both include the same seq_idx resets (3
packed samples). Prints a markdown table; ``--out`` also writes it with the command and machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from omni_train.platform.kernels.mamba import ssd_chunk_scan

HEADS, HEAD_DIM, STATE, GROUPS, CHUNK = 32, 64, 128, 4, 128


def sequential_scan(x, dt, a, b, c, d, seq_idx):
    """fp32 baseline: one time step per iteration. Shapes as ssd_chunk_scan's (x, dt, A, B,
    C, D, seq_idx)."""
    batch, seqlen, h, p = x.shape
    dt = F.softplus(dt)
    b = b.repeat_interleave(h // b.shape[2], dim=2)
    c = c.repeat_interleave(h // c.shape[2], dim=2)
    state = x.new_zeros(batch, h, p, b.shape[-1])
    out = torch.empty_like(x)
    for t in range(seqlen):
        if t and bool((seq_idx[:, t] != seq_idx[:, t - 1]).any()):
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None, None]
        state = torch.exp(dt[:, t] * a)[:, :, None, None] * state + (
            (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, :, None, :]
        )
        out[:, t] = (state * c[:, t, :, None, :]).sum(-1) + d[:, None] * x[:, t]
    return out


def chunked_scan(x, dt, a, b, c, d, seq_idx):
    return ssd_chunk_scan(x, dt, a, b, c, CHUNK, D=d, dt_softplus=True, seq_idx=seq_idx)


def chunked_train_step(x, dt, a, b, c, d, seq_idx):
    x.grad = None
    chunked_scan(x, dt, a, b, c, d, seq_idx).sum().backward()


def inputs(seqlen: int, requires_grad: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, seqlen, HEADS, HEAD_DIM, generator=g)
    dt = torch.randn(1, seqlen, HEADS, generator=g) - 2
    a = -torch.rand(HEADS, generator=g) - 0.5
    b = torch.randn(1, seqlen, GROUPS, STATE, generator=g) / STATE**0.5
    c = torch.randn(1, seqlen, GROUPS, STATE, generator=g) / STATE**0.5
    d = torch.ones(HEADS)
    thirds = [seqlen // 3, seqlen // 3, seqlen - 2 * (seqlen // 3)]
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(thirds))[None].int()
    if requires_grad:
        x.requires_grad_(True)
    return x, dt, a, b, c, d, seq_idx


def best_ms(fn, args, repeats: int) -> float:
    fn(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times) if repeats < 3 else statistics.median(sorted(times)[: repeats // 2 + 1])


def run(seqlens: list[int], repeats: int) -> list[str]:
    rows = [
        "| tokens | sequential fwd (ms) | chunked fwd (ms) | speed-up | chunked fwd+bwd (ms) "
        "| max rel diff |",
        "|---|---|---|---|---|---|",
    ]
    for seqlen in seqlens:
        args = inputs(seqlen)
        with torch.no_grad():
            ref, got = sequential_scan(*args), chunked_scan(*args)
            diff = float((got - ref).abs().max() / ref.abs().max())
            t_seq = best_ms(sequential_scan, args, repeats)
            t_chunk = best_ms(chunked_scan, args, repeats)
        t_train = best_ms(chunked_train_step, inputs(seqlen, requires_grad=True), repeats)
        rows.append(
            f"| {seqlen} | {t_seq:.1f} | {t_chunk:.1f} | {t_seq / t_chunk:.1f}x | "
            f"{t_train:.1f} | {diff:.1e} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.seqlens, args.repeats)
    print("\n".join(rows))
    if args.out:
        header = [
            "# CPU Mamba2 scan: chunked SSD vs step-by-step recurrence",
            "",
            f"- Command: `{' '.join([os.path.relpath(sys.executable), *sys.argv])}`",
            f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
            f"torch {torch.__version__}, {args.threads} thread(s)",
            f"- Shapes: batch 1, {HEADS} heads x {HEAD_DIM}, state {STATE}, {GROUPS} groups, "
            f"chunk {CHUNK} (one Mamba2 mixer of the published LM per TP rank at TP=2); 3 packed "
            "samples (state resets). fp32. Median of the fastest half of the repeats.",
            "",
        ]
        with open(args.out, "w") as f:
            f.write("\n".join(header + rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
