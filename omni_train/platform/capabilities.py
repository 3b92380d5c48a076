"""What this process can run on, and the building block chosen for each part.

Each block is chosen by what is present, not by one CPU/GPU switch:

============  =========================================  ====================================
block         chosen                                     otherwise
============  =========================================  ====================================
device        ``cuda`` when torch sees a GPU (and        ``cpu``
              ``OMNI_TRAIN_PLATFORM`` is not ``cpu``)
collectives   ``nccl`` on CUDA                           ``gloo``
linear/norm   Transformer Engine (fused norm+linear)     ``torch``: megatron's parallel linears
              on CUDA when it imports                    + our fused-in-fp32 norms
attention     ``te`` (cuDNN/flash, THD, ring CP) with    ``flex`` on CUDA: FlexAttention with a
              TE; see the right column otherwise         block-sparse document mask (never an
                                                         s x s mask); ``sdpa`` on CPU: dense
                                                         masked SDPA, the reference
experts       ``te_grouped`` (TE grouped GEMM) with TE   ``sequential`` (megatron SequentialMLP)
mamba         ``mamba_ssm`` (Triton) on CUDA when it     ``torch``: our chunked SSD scan,
              imports                                    causal conv and gated norm
optimizer     ``te_fused_adam`` / ``apex_fused_adam``    ``torch_adamw`` (always on CPU)
              on CUDA, as megatron picks them
============  =========================================  ====================================

The patch sets that follow from the choice (:mod:`omni_train.platform.patches`): the CPU
device patches only on the CPU, gloo's collective fixes only with gloo, and each
missing-library stand-in wherever that library is not used: absent, or present but unusable
(``OMNI_TRAIN_PLATFORM=cpu`` on a GPU host keeps Transformer Engine and mamba-ssm out).

:func:`probe` imports the optional libraries; :func:`choose` is a pure function of the probe,
so every combination is testable on a machine that has none of them.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, fields

import torch

# Importable module -> the library it stands for. A library counts as present only if the
# module imports without error: TE raises OSError/RuntimeError (not only ImportError) when its
# CUDA libraries are missing, and mamba-ssm's package imports even when its Triton ops do not.
LIBRARY_MODULES = {
    "transformer_engine": "transformer_engine.pytorch",
    "mamba_ssm": "mamba_ssm.ops.triton.ssd_combined",
    "triton": "triton",
    "apex": "apex.optimizers",
}

ATTENTION = ("te", "flex", "sdpa")


@dataclass(frozen=True)
class Libraries:
    """What imports in this process (``cuda``: torch sees a GPU)."""

    cuda: bool
    transformer_engine: bool
    mamba_ssm: bool
    triton: bool
    apex: bool
    flex_attention: bool

    def present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]


@dataclass(frozen=True)
class Platform:
    """The chosen blocks (see the module docstring) and the patch sets they imply."""

    name: str  # "cuda" | "cpu": the device type
    backend: str  # torch.distributed backend
    device: torch.device
    libraries: Libraries
    linear: str  # "te" | "torch"
    attention: str  # "te" | "flex" | "sdpa"
    experts: str  # "te_grouped" | "sequential"
    mamba: str  # "mamba_ssm" | "torch"
    optimizer: str  # "te_fused_adam" | "apex_fused_adam" | "torch_adamw"
    fusions: str  # "compiled" | "eager": megatron's jit_fuser functions (device.eager_fusions)
    patch_sets: tuple[str, ...]  # names in omni_train.platform.patches.PATCH_SETS, in order

    @property
    def is_cuda(self) -> bool:
        return self.name == "cuda"

    @property
    def has_transformer_engine(self) -> bool:
        """Transformer Engine layers are used (not merely importable)."""
        return self.linear == "te"

    def describe(self) -> str:
        """One log line: every block and why (the libraries present)."""
        blocks = (
            f"device={self.device} collectives={self.backend} linear={self.linear} "
            f"attention={self.attention} experts={self.experts} mamba={self.mamba} "
            f"optimizer={self.optimizer} fusions={self.fusions}"
        )
        present = ",".join(self.libraries.present()) or "none"
        patches = ",".join(self.patch_sets) or "none"
        return f"platform {self.name}: {blocks} (present: {present}; patches: {patches})"


def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - see LIBRARY_MODULES: any failure means "not usable"
        return False
    return True


def _has_flex_attention() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def forced_platform() -> str:
    forced = os.environ.get("OMNI_TRAIN_PLATFORM", "").lower()
    if forced not in ("", "cpu", "cuda"):
        raise ValueError(f"OMNI_TRAIN_PLATFORM={forced!r}: use 'cpu', 'cuda' or leave it unset")
    return forced


# "off": megatron-core's own layers on CUDA even where Transformer Engine is installed (a LoRA
# stage sets it: TE's linears have no adapters here, docs/peft.md); "" or "on": TE where present
TE_SWITCH = "OMNI_TRAIN_TRANSFORMER_ENGINE"


def transformer_engine_off() -> bool:
    value = os.environ.get(TE_SWITCH, "").lower()
    if value not in ("", "on", "off"):
        raise ValueError(f"{TE_SWITCH}={value!r}: use 'on', 'off' or leave it unset")
    return value == "off"


def probe() -> Libraries:
    """Import-probe the optional libraries (each import is tried once per process)."""
    return Libraries(
        cuda=torch.cuda.is_available(),
        flex_attention=_has_flex_attention(),
        **{name: importable(module) for name, module in LIBRARY_MODULES.items()},
    )


def choose(
    libs: Libraries, forced: str = "", local_rank: int = 0, te_off: bool = False
) -> Platform:
    """The blocks for ``libs``; ``forced`` is ``OMNI_TRAIN_PLATFORM`` ("", "cpu", "cuda");
    ``te_off`` (``OMNI_TRAIN_TRANSFORMER_ENGINE=off``): no Transformer Engine layers (its fused
    Adam, a separate choice, stays)."""
    if forced == "cuda" and not libs.cuda:
        raise ValueError("OMNI_TRAIN_PLATFORM=cuda but torch sees no CUDA device")
    cuda = libs.cuda and forced != "cpu"
    te = cuda and libs.transformer_engine and not te_off
    if te:
        attention = "te"
    elif cuda and libs.flex_attention:
        attention = "flex"
    else:
        attention = "sdpa"
    mamba = "mamba_ssm" if cuda and libs.mamba_ssm else "torch"
    # megatron.core.optimizer takes TE's FusedAdam, else apex's, else torch's AdamW; on the
    # CPU the fused ones cannot run, so the CPU device patches pin torch's.
    if cuda and libs.transformer_engine:
        optimizer = "te_fused_adam"
    elif cuda and libs.apex:
        optimizer = "apex_fused_adam"
    else:
        optimizer = "torch_adamw"
    patch_sets = []
    if not cuda:
        patch_sets += ["cpu_device", "gloo_collectives"]
    if not te:
        patch_sets.append("no_transformer_engine")
    if mamba == "torch":
        patch_sets.append("no_mamba_ssm")
    if optimizer == "torch_adamw":
        patch_sets.append("torch_optimizer")
    return Platform(
        name="cuda" if cuda else "cpu",
        backend="nccl" if cuda else "gloo",
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
        libraries=libs,
        linear="te" if te else "torch",
        attention=attention,
        experts="te_grouped" if te else "sequential",
        mamba=mamba,
        optimizer=optimizer,
        fusions="compiled" if cuda else "eager",
        patch_sets=tuple(patch_sets),
    )
