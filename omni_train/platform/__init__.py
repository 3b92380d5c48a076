"""The platform: what this process runs on, the building blocks chosen for it, and the patches
megatron-core needs there. One package, split by kind:

* ``capabilities``: detection (device, libraries) and the choice of each block;
* ``registry``: how a patch is declared, applied and checked;
* ``device``: patches for the CPU device (torch proxy, CPU RNG, gloo collectives);
* ``standins``: missing-library patches (Transformer Engine, mamba-ssm, fused Adam, Triton);
* ``kernels``: the pure-PyTorch kernels the stand-ins and the layer specs use (attention,
  norms and norm+linear, the Mamba2 scan, tensor ops), on any device.

:func:`setup` is called once per process before anything is built; a stage logs the chosen
blocks (``Platform.describe()``) at start-up and records them in its manifest.
``OMNI_TRAIN_PLATFORM=cpu`` selects the CPU device on a GPU host (comparisons, tests);
``OMNI_TRAIN_PLATFORM=cuda`` insists on a GPU. ``OMNI_TRAIN_TRANSFORMER_ENGINE=off`` builds
megatron-core's own layers on CUDA where Transformer Engine is installed (a LoRA stage sets it).
"""

from __future__ import annotations

import os
import sys
from functools import cache

import torch

from omni_train.log import install_filters
from omni_train.platform import device, registry, standins
from omni_train.platform.capabilities import (
    TE_SWITCH,
    Libraries,
    Platform,
    choose,
    forced_platform,
    probe,
    transformer_engine_off,
)

__all__ = [
    "TE_SWITCH",
    "Libraries",
    "Platform",
    "check_patches",
    "detect",
    "patch_sets",
    "patched_modules",
    "setup",
]


def patch_sets() -> dict[str, registry.PatchSet]:
    """Every set, by name, in the order they are applied. The sets are declared by the modules
    that own them (``device``, ``standins``); :mod:`.registry` only applies and checks them."""
    return {s.name: s for s in (*device.PATCH_SETS, *standins.PATCH_SETS)}


@cache
def detect() -> Platform:
    """This process's platform (libraries probed once)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return choose(probe(), forced_platform(), local_rank, transformer_engine_off())


@cache
def setup() -> Platform:
    """Detect the platform and prepare megatron-core for it. Call before building anything."""
    platform = detect()
    standins.provide_tensor_ops()
    if platform.is_cuda:
        torch.cuda.set_device(platform.device)
    else:
        install_filters(platform="cpu")  # the CPU's own noise (omni_train.log.QUIET)
    if platform.fusions == "eager":
        device.eager_fusions()
    sets = patch_sets()
    for name in platform.patch_sets:
        registry.apply(sets[name])
    return platform


def check_patches() -> list[str]:
    """Problems with any patch of any set (targets gone, patches no longer needed), whatever
    this process's platform: the suite runs it so a megatron-core upgrade fails loudly."""
    standins.provide_tensor_ops()  # else ssm.mamba_mixer cannot even be imported
    return [p for s in patch_sets().values() for p in registry.check(s)]


def patched_modules() -> list[str]:
    """Names of the megatron modules whose ``torch`` is currently a proxy."""
    return [
        t.module
        for s in patch_sets().values()
        for t in s.proxies
        if t.module in sys.modules and sys.modules[t.module].torch is s.proxy
    ]
