"""What a checkpoint's integrity record costs: head-and-tail digests against full ones.

A save digests every file it wrote (each rank its own share) and a resume verifies them from one
process (``omni_train.checkpoint.integrity``). This times both modes on the same files, in one
run: a checkpoint-like folder of ``--files`` files of ``--file-mib`` MiB of random bytes (written
first; the OS cache is dropped where possible, so the reads come from the disk), and, if given,
a real checkpoint folder (``--checkpoint``). Baseline: ``full`` (every byte through SHA-256).

    python benchmarks/checkpoint_integrity.py [--files 8] [--file-mib 256]
        [--checkpoint runs/smoke/checkpoints/step_0000020] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omni_train.checkpoint import integrity  # noqa: E402

CACHE = {
    True: "page cache dropped before each run (the digests read the disk)",
    False: "page cache NOT dropped (needs root): the reads may come from memory",
}


def _drop_cache() -> bool:
    """Drop the page cache (root on Linux), so that digests read the disk; False if not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(folder: Path, mode: str, repeats: int = 3) -> tuple[float, int]:
    """(best seconds to digest every file, bytes read) over ``repeats`` cold runs."""
    names = integrity.files_of(folder)
    best = float("inf")
    for _ in range(repeats):
        _drop_cache()
        start = time.perf_counter()
        integrity.digest_files(folder, names, mode)
        best = min(best, time.perf_counter() - start)
    size = sum((folder / n).stat().st_size for n in names)
    read = size if mode == "full" else sum(
        min((folder / n).stat().st_size, 2 * integrity.HEAD_TAIL) for n in names
    )  # fmt: skip
    return best, read


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--file-mib", type=int, default=256)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as d:
        folder = Path(d)
        for i in range(args.files):
            with (folder / f"__{i}_0.distcp").open("wb") as f:
                for _ in range(args.file_mib):
                    f.write(os.urandom(1 << 20))
        label = f"{args.files} files x {args.file_mib} MiB (random)"
        rows.append((label, {m: measure(folder, m) for m in integrity.MODES}))
    if args.checkpoint:
        rows.append((f"checkpoint {args.checkpoint}", {m: measure(args.checkpoint, m)
                                                       for m in integrity.MODES}))  # fmt: skip
    cold = _drop_cache()
    disk = subprocess.run(["df", "-h", str(ROOT)], capture_output=True, text=True).stdout
    lines = [
        "# Checkpoint integrity records: what the digests cost",
        "",
        f"Command: `python benchmarks/checkpoint_integrity.py --files {args.files} --file-mib "
        f"{args.file_mib}{' --checkpoint ' + str(args.checkpoint) if args.checkpoint else ''}` "
        f"on {platform.machine()} ({os.cpu_count()} cores), one process, best of 3, "
        f"{CACHE[cold]}.",
        "",
        "| files | mode | bytes read | seconds | GB/s of checkpoint | full / this |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, by_mode in rows:
        full_s = by_mode["full"][0]
        total = by_mode["full"][1]
        for mode, (seconds, read) in by_mode.items():
            lines.append(
                f"| {label} | {mode} | {read / 1e6:,.1f} MB | {seconds:.3f} | "
                f"{total / seconds / 1e9:.2f} | {full_s / seconds:.1f}x |"
            )
    lines += [
        "",
        "*GB/s of checkpoint*: the checkpoint's size over the time to digest it, so a full "
        "digest's figure is SHA-256's (and the disk's) throughput, and head_tail's is how fast a "
        f"checkpoint of these file sizes is checked (it reads {2 * integrity.HEAD_TAIL // 1024} "
        "KiB per file, whatever its size).",
        "",
        "```",
        disk.strip(),
        "```",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
