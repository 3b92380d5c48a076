"""Which platform this process runs on, and what that implies for megatron-core.

GPU (CUDA present): NCCL, Transformer Engine / mamba-ssm layer specs, no patches.
CPU (no CUDA): gloo, pure-PyTorch layer specs, and ``cpu_patches`` applied once.
The choice is automatic; ``OMNI_TRAIN_PLATFORM=cpu`` forces the CPU path on a GPU machine
(for CPU-vs-GPU comparisons), never the other way round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class Platform:
    name: str  # "cuda" | "cpu"
    backend: str  # torch.distributed backend
    device: torch.device
    has_transformer_engine: bool

    @property
    def is_cuda(self) -> bool:
        return self.name == "cuda"


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises OSError/RuntimeError, not only ImportError, without CUDA
        return False
    return True


@cache
def detect() -> Platform:
    forced = os.environ.get("OMNI_TRAIN_PLATFORM", "").lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"OMNI_TRAIN_PLATFORM={forced!r}: use 'cpu', 'cuda' or leave it unset")
    cuda = torch.cuda.is_available() and forced != "cpu"
    if forced == "cuda" and not cuda:
        raise ValueError("OMNI_TRAIN_PLATFORM=cuda but torch sees no CUDA device")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return Platform("cuda", "nccl", torch.device("cuda", local_rank), _has_transformer_engine())
    return Platform("cpu", "gloo", torch.device("cpu"), False)


@cache
def setup() -> Platform:
    """Detect the platform and prepare megatron-core for it. Call before building anything."""
    platform = detect()
    if platform.is_cuda:
        torch.cuda.set_device(platform.device)
    else:
        from omni_train.platform.cpu_patches import apply_cpu_patches

        apply_cpu_patches()
    return platform
