"""Run a stage in fresh processes (torchrun, one per rank) and return its manifest.

Used where one Python process drives several stage runs: tests, benchmarks, and the curriculum
command, which runs stages back to back (each a fresh job, as on a cluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def torchrun(
    nproc: int, *target: str, timeout: int | None = 1800, capture: bool = True
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc TARGET...`` (a script path or ``-m
    module``, then its arguments), one thread per rank. Raises ``RuntimeError`` on failure, with
    the run's output tail when it was captured (``capture=False`` streams it instead)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *target,
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on few cores: one thread each
    proc = subprocess.run(cmd, env=env, capture_output=capture, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = f"\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}" if capture else ""
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}{tail}")
    return proc


def launch_stage(nproc: int, output_dir: str | os.PathLike, *overrides: str, timeout: int = 1800):
    """``torchrun --nproc-per-node nproc -m omni_train.train`` with ``overrides``; the run's
    ``manifest.json`` as a dict. Raises ``RuntimeError`` with the run's output tail on failure."""
    target = ["-m", "omni_train.train", *overrides, f"checkpoint.output_dir={output_dir}"]
    torchrun(nproc, *target, timeout=timeout)
    return json.loads((Path(output_dir) / "manifest.json").read_text())
