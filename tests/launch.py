"""Run a stage in real processes (torchrun, gloo) and return its manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omni_train.stage.launch import launch_stage

# Equivalence runs: 3 exact-fp32 steps, global batch 4 in micro-batches of 2.
EXACT = [
    "stage=smoke",
    "model=tiny",
    "trainer.precision=fp32",
    "trainer.train_steps=3",
    "trainer.micro_batch_size=2",
    "trainer.global_batch_size=4",
    "trainer.save_interval=0",
    "trainer.eval_iters=1",
]


launch = launch_stage  # (nproc, output_dir, *overrides) -> manifest, in real processes


def assert_close(a: list[float], b: list[float], rtol: float, what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} values"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert abs(x - y) <= rtol * abs(y), (
            f"{what}[{i}]: {x!r} vs {y!r} (rel {abs(x - y) / abs(y):.2e})"
        )


_COMPARE = """
import sys, tempfile, torch, torch.distributed as dist
dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
from megatron.core.dist_checkpointing.serialization import load_plain_tensors
from omni_train.checkpoint import find_latest
def tensors(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(tensors(value, f"{prefix}{key}."))
        elif torch.is_tensor(value):
            out[prefix + key] = value
    return out
a, b = (tensors(load_plain_tensors(str(find_latest(d) or d))) for d in sys.argv[1:3])
if sys.argv[3:] == ["common"]:
    a = {k: v for k, v in a.items() if k in b}
else:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
print(len(a))
for key in sorted(a):
    if not torch.equal(a[key], b[key]):
        print("DIFF", key)
"""


def differing_weights(run_a: Path, run_b: Path, common_only: bool = False) -> tuple[int, list[str]]:
    """(number of model tensors, keys that are not bit-identical) of two runs' latest
    checkpoints (or two checkpoint folders); ``common_only``: compare the tensors both hold
    (else their key sets must be equal). Runs in a subprocess: reading a torch_dist
    checkpoint needs a process group."""
    proc = subprocess.run(
        [sys.executable, "-c", _COMPARE, str(run_a), str(run_b), *(["common"] * common_only)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.split("\n")
    return int(lines[0]), [line[5:] for line in lines[1:] if line.startswith("DIFF ")]
