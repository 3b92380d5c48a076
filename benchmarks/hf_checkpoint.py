"""Import / export of Hugging Face checkpoints: time and memory at full width, reduced depth.

The checkpoints are the released architecture at full width (hidden 2688, vocabulary 131,072,
128 experts of 1,856, RADIO-H width, Parakeet width, both projectors) with fewer layers: 2 ViT
blocks, 2 conformer layers and the LM patterns ``M*E`` and ``M*EE`` (one and two MoE layers, the
largest layers), random bf16 weights under the released names, in 2 GiB shards with an index.
Each command runs in its own process; a sampler reads that process tree's /proc status every
20 ms:

- ``anon``: peak anonymous memory (what the tool allocates; it cannot be reclaimed);
- ``rss``: peak resident memory, file-backed pages of the memory-mapped input included (the
  kernel may drop those under pressure: they are the page cache of the files being read).

Baselines in the same run: reading the files (``cat > /dev/null``) and the plain copy through
safetensors' own API (``load_file`` + ``save_file`` of every shard: every byte read and written,
nothing renamed or converted), the floor for any converter.

Extrapolation to the full model (33,015,546,816 parameters, 66.0 GB in bf16): a line through the
two depths, in bytes: time = a + b x GB, anonymous peak = c + d x GB (d ~ 0 means the peak does
not grow with the model: export holds one load group at a time, the largest being one MoE layer,
2.55 GB, which both depths have).

Usage: python benchmarks/hf_checkpoint.py [--out benchmarks/results/hf_checkpoint_cpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FULL_BYTES = 33_015_546_816 * 2
PATTERNS = ("M*E", "M*EE")


def reduced(pattern: str) -> list[str]:
    return [
        "model=nano_omni_30b_a3b",
        f"model.hybrid_pattern={pattern}",
        "model.vision.num_layers=2",
        "model.audio.num_layers=2",
    ]


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except FileNotFoundError:
            continue
        todo += [int(c) for c in children]
    return pids


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak anonymous / resident memory of ``cmd`` and its children."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = {"anon": 0, "rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon = rss = 0
            for p in _tree(proc.pid):
                s = _status(p)
                anon += s.get("RssAnon", 0)
                rss += s.get("VmRSS", 0)
            peak["anon"], peak["rss"] = max(peak["anon"], anon), max(peak["rss"], rss)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode()[-4000:]}")
    return {"seconds": time.perf_counter() - start, **peak}


def write_reduced_checkpoint(folder: Path, pattern: str) -> int:
    """Random bf16 weights of the reduced model under the released names; returns bytes."""
    import torch

    from omni_train.config import hf as hf_config
    from omni_train.config import to_dict
    from omni_train.hf import weights
    from omni_train.hf.convert import _job, _MetaModel, _tensor_keys
    from omni_train.hf.safetensors_io import ShardedWriter, TensorPlan

    cfg = _job(None, reduced(pattern), "bf16")
    section = to_dict(cfg)["model"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(hf_config.omni_config(section), indent=2))
    with _MetaModel(cfg) as meta:
        prefixes = weights.Prefixes()
        plans, makers = [], []
        for key, t in _tensor_keys(meta.model, tuple(f"{c}." for c in cfg.model.components)):
            rule = weights.rule_for(key, section, prefixes)
            if rule is None:
                continue
            dtype = torch.bfloat16 if t.is_floating_point() else t.dtype
            probe = torch.empty(t.shape, dtype=dtype, device="meta")
            for name, part in zip(rule.released, rule.to_released(probe), strict=True):
                plans.append(TensorPlan(name, part.dtype, tuple(part.shape)))
                makers.append(part)
        name = "vision_model.radio_model.summary_idxs"
        plans.append(TensorPlan(name, torch.int64, (2,)))
        makers.append(torch.tensor([0, 1]))
        writer = ShardedWriter(folder, plans, 2 * 2**30)
        g = torch.Generator().manual_seed(0)
        for plan, probe in zip(plans, makers, strict=True):
            if probe.device.type != "meta":
                value = probe
            elif plan.dtype.is_floating_point:
                value = (torch.randn(plan.shape, generator=g) * 0.02).to(plan.dtype)
                if plan.name.endswith("running_var"):
                    value = value.abs() + 1
            else:
                value = torch.zeros(plan.shape, dtype=plan.dtype)
            writer.write(plan.name, value)
        writer.close()
        return writer.total_bytes


NAIVE = """
import sys, pathlib
from safetensors.torch import load_file, save_file
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dst.mkdir()
shards = {p.name: load_file(p) for p in sorted(src.glob("*.safetensors"))}
for name, tensors in shards.items():
    save_file(tensors, dst / name)
"""


def run_depth(work: Path, pattern: str, env: dict) -> tuple[int, int, dict]:
    """(bytes, shards, rows) for one reduced depth."""
    src = work / "hf"
    nbytes = write_reduced_checkpoint(src, pattern)
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    rows = {
        "read the files (cat > /dev/null)": measure(
            ["bash", "-c", f"cat {' '.join(files)} > /dev/null"]
        ),
        "copy: safetensors load_file + save_file": measure(
            [sys.executable, "-c", NAIVE, str(src), str(work / "copy")], env
        ),
    }
    cli = [sys.executable, "-m", "omni_train.cli", "checkpoint"]
    rows["omni-train import-hf"] = measure(
        [*cli, "import-hf", str(src), "--out", str(work / "dist")], env
    )
    rows["omni-train export-hf"] = measure(
        [*cli, "export-hf", str(work / "dist"), "--out", str(work / "back")], env
    )
    return nbytes, len(files), rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="hf_bench_"))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    results = {}
    for pattern in PATTERNS:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            results[pattern] = run_depth(work, pattern, env)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"Machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}."
        " Full width, LM pattern as given, 2 ViT blocks, 2 conformer layers, bf16.",
        "",
        "| LM pattern | GB | command | wall s | x copy | anon peak GB | rss peak GB |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for pattern, (nbytes, _, rows) in results.items():
        copy = rows["copy: safetensors load_file + save_file"]["seconds"]
        for name, r in rows.items():
            lines.append(
                f"| {pattern} | {nbytes / 1e9:.2f} | {name} | {r['seconds']:.1f} | "
                f"{r['seconds'] / copy:.1f} | {r['anon'] / 1e9:.2f} | {r['rss'] / 1e9:.2f} |"
            )
    (b1, _, r1), (b2, _, r2) = results[PATTERNS[0]], results[PATTERNS[1]]
    copy = "copy: safetensors load_file + save_file"
    copy_rate = (r2[copy]["seconds"] - r1[copy]["seconds"]) / (b2 - b1) * 1e9
    lines += [
        "",
        f"Extrapolated to the full model ({FULL_BYTES / 1e9:.1f} GB bf16) from the larger depth: "
        "memory on the line through the two depths; time with the larger of the tool's own "
        f"per-GB slope and the plain copy's ({copy_rate:.1f} s/GB here: every byte is read and "
        "written once, and a two-point slope of a run dominated by start-up is noisy). Times "
        "are page-cache times on this machine; at full size the disk's bandwidth bounds them.",
        "",
        "| command | s per GB (two-point) | wall min | anon GB per GB | anon peak GB | "
        "anon / (2 x bf16) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("omni-train import-hf", "omni-train export-hf"):
        t_slope = (r2[name]["seconds"] - r1[name]["seconds"]) / (b2 - b1) * 1e9
        t_full = r2[name]["seconds"] + max(t_slope, copy_rate) * (FULL_BYTES - b2) / 1e9
        a_slope = (r2[name]["anon"] - r1[name]["anon"]) / (b2 - b1)
        a_full = r2[name]["anon"] + max(a_slope, 0.0) * (FULL_BYTES - b2)
        lines.append(
            f"| {name} | {t_slope:.1f} | {t_full / 60:.1f} | {a_slope:.3f} | "
            f"{a_full / 1e9:.1f} | {a_full / (2 * FULL_BYTES):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(
            "# HF checkpoint import / export (CPU)\n\nCommand: `python benchmarks/hf_checkpoint.py"
            f" --out {args.out}`\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
