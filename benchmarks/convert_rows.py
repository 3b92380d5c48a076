"""``data convert`` at scale: N LLaVA-style rows (default 100,000) with image files, 1 worker
(the baseline, in the same run) vs W workers; wall time, rows/s and the peak resident memory of
the converting process tree, which must not grow with N (streaming).

    python benchmarks/convert_rows.py [--rows 100000] [--workers 2] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
from omni_train.datatools.convert import convert
src, media, out, workers = sys.argv[1:5]
start = time.perf_counter()
counts = convert(src, media, out, workers=int(workers), samples_per_shard=1000)
elapsed = time.perf_counter() - start
rss = max(resource.getrusage(who).ru_maxrss for who in
          (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps({"seconds": elapsed, "peak_rss_mib": rss / 1024, "counts": counts}))
"""


def run(src: Path, media: Path, out: Path, workers: int) -> dict:
    """One conversion in a fresh process, so its peak RSS is its own."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(media), str(out), str(workers)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args()
    from omni_train.datatools.encode import encode_png

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        media = tmp / "media"
        media.mkdir()
        rng = np.random.default_rng(0)
        for i in range(16):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            (media / f"{i}.png").write_bytes(encode_png(pixels))
        src = tmp / "rows.jsonl"
        with src.open("w") as f:
            for i in range(args.rows):
                row = {"id": f"r{i}", "image": f"{i % 16}.png", "conversations": [
                    {"from": "human", "value": "<image>\\nWhat is shown?"},
                    {"from": "gpt", "value": f"Noise number {i % 16}."}]}  # fmt: skip
                f.write(json.dumps(row) + "\n")
        small = tmp / "small.jsonl"
        small.write_text("".join(src.read_text().splitlines(True)[: args.rows // 10]))
        results = {}
        for name, rows, workers in (
            ("1 worker, N/10 rows", small, 1),
            ("1 worker", src, 1),
            (f"{args.workers} workers", src, args.workers),
        ):
            start = time.perf_counter()
            r = run(rows, media, tmp / f"out_{len(results)}", workers)
            r["wall"] = time.perf_counter() - start
            results[name] = r
    base = results["1 worker"]
    lines = [
        f"data convert, {args.rows:,} LLaVA-style rows with 32x32 PNG files "
        f"({platform.machine()}, {os.cpu_count()} cores)",
        "",
        "| run | rows | seconds | rows/s | peak RSS MiB | speed vs 1 worker |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        n = r["counts"]["converted"]
        lines.append(
            f"| {name} | {n:,} | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | "
            f"{r['peak_rss_mib']:.0f} | {base['seconds'] / r['seconds'] * n / args.rows:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(
            "# data convert at scale\n\nCommand: `python benchmarks/convert_rows.py "
            f"--rows {args.rows} --workers {args.workers}`\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
