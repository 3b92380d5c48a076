"""Stand-ins for missing libraries: what megatron-core calls from Transformer Engine,
mamba-ssm, apex and Triton, on any device where that library is not used.

A library is "not used" when it does not import, or when it cannot run on the chosen device
(``OMNI_TRAIN_PLATFORM=cpu`` on a GPU host). Each set replaces only the names megatron binds
to that library, with the pure-PyTorch kernels of :mod:`omni_train.platform.kernels`, which
keep the library's parameter names and shapes (checkpoints move between platforms):

* ``no_transformer_engine``: MambaStack's hard-wired final ``TENorm``, the fp32 router GEMM
  name, the THD index kernel of the Mamba context-parallel path, and the FP8 check of
  ``CheckpointWithoutOutput`` (the layer specs choose our leaves themselves:
  :mod:`omni_train.model.specs`).
* ``no_mamba_ssm``: the Mamba2 mixer's fused conv + SSD scan and gated RMSNorm.
* ``torch_optimizer``: megatron's torch.optim path (no TE/apex fused Adam) restores AdamW step
  counts wrongly and asserts on a never-stepped optimizer.
* Triton: megatron's Triton tensor-ops module is registered as pure PyTorch when ``triton`` is
  absent (:func:`provide_tensor_ops`; the mixer imports it at module level).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import torch

from omni_train.platform.kernels import tensor_ops
from omni_train.platform.kernels.cp_layout import thd_partitioned_indices
from omni_train.platform.registry import AttributePatch, PatchReport, PatchSet, SourcePatch


def _restore_adam_steps(original: Any) -> Any:
    """Wrap DistributedOptimizer.load_state_dict for the torch.optim path (no Apex/TE).

    megatron-core 0.16.1 writes the saved step into every parameter state as one *shared*
    tensor, then the dp_reshardable parameter-state copy overwrites it with the template's 0.
    torch AdamW then restarts bias correction (and, with a shared tensor, advances it once per
    parameter). Afterwards each parameter gets its own step tensor from its group's saved step.
    """

    def load_state_dict(self: Any, state_dict: Any) -> None:
        original(self, state_dict)
        for group in self.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                if param in self.optimizer.state:
                    self.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))

    load_state_dict.__wrapped__ = original
    return load_state_dict


def _torch_mamba_packing_support(for_inference_not_training: bool = True):
    """Stand-in for mamba_mixer._check_mamba_sequence_packing_support: the pure-PyTorch
    training kernels (omni_train.platform.kernels.mamba) honour ``seq_idx``; packed inference
    needs mamba-ssm."""
    if for_inference_not_training:
        return False, "Mamba inference with packed sequences needs the GPU kernels (mamba-ssm)"
    return True, None


class _TorchTex(types.SimpleNamespace):
    """The one ``transformer_engine_torch`` kernel megatron's Mamba context-parallel path calls
    (``thd_get_partitioned_indices``), as pure PyTorch."""

    @staticmethod
    def thd_get_partitioned_indices(cu_seqlens, total_tokens, world_size, rank):
        return thd_partitioned_indices(cu_seqlens, total_tokens, world_size, rank)


def _tex_version_ok(version: str, *args: Any, **kwargs: Any) -> bool:
    """mamba_context_parallel asks TE >= 1.10 only for the THD kernel ``_TorchTex`` provides."""
    return True


NO_TRANSFORMER_ENGINE = PatchSet(
    "no_transformer_engine",
    "Transformer Engine not used (absent, or the device is the CPU)",
    library="transformer_engine",
    attributes=(
        AttributePatch(
            "megatron.core.ssm.mamba_block",
            "TENorm",
            "omni_train.platform.kernels.layers:TorchNorm",
            "self.final_norm = TENorm(",
            "ssm/mamba_block.py: MambaStack's final norm is hard-wired to TENorm (TE only)",
        ),
        AttributePatch(
            "megatron.core.ssm.mamba_context_parallel",
            "tex",
            _TorchTex(),
            "tex.thd_get_partitioned_indices(",
            "ssm/mamba_context_parallel.py: Mamba CP with packed (THD) sequences calls TE's CUDA "
            "kernel thd_get_partitioned_indices",
            must_exist=False,
        ),
        AttributePatch(
            "megatron.core.ssm.mamba_context_parallel",
            "is_te_min_version",
            _tex_version_ok,
            'assert tex is not None and is_te_min_version("1.10.0")',
            "ssm/mamba_context_parallel.py: the THD path asserts TE >= 1.10 (for that kernel)",
        ),
        AttributePatch(
            "megatron.core.transformer.moe.moe_utils",
            "te_general_gemm",
            None,
            "if te_general_gemm is not None",
            "transformer/moe/moe_utils.py: te_general_gemm is only bound when TE imports "
            "(fp32 router); None takes megatron's torch path",
            must_exist=False,
        ),
    ),
    sources=(
        SourcePatch(
            "megatron.core.tensor_parallel.random",
            "CheckpointWithoutOutput.__init__",
            "self.fp8 = fp8 is not None",
            "self.fp8 = fp8 not in (None, False)",
            "tensor_parallel/random.py: CheckpointWithoutOutput() (fp8=False, as "
            "TransformerLayer builds it for 'layernorm' recompute) sets self.fp8 = True and then "
            "calls Transformer Engine's FP8GlobalStateManager, which exists only with TE; with "
            "TE it answers 'fp8 off'",
        ),
    ),
)

# The Mamba2 mixer: megatron's MambaMixer class runs unchanged; only the mamba-ssm kernels it
# calls (Triton/CUDA code) become the pure-PyTorch versions, on whatever device the mixer is.
NO_MAMBA_SSM = PatchSet(
    "no_mamba_ssm",
    "mamba-ssm not used (absent, or the device is the CPU)",
    library="mamba_ssm",
    attributes=(
        AttributePatch(
            "megatron.core.ssm.mamba_mixer",
            "HAVE_MAMBA_SSM",
            True,
            "if not HAVE_MAMBA_SSM:",
            "ssm/mamba_mixer.py: MambaMixer.__init__ raises ImportError without mamba-ssm",
        ),
        AttributePatch(
            "megatron.core.ssm.mamba_mixer",
            "mamba_split_conv1d_scan_combined",
            "omni_train.platform.kernels.mamba:mamba_split_conv1d_scan_combined",
            "y = mamba_split_conv1d_scan_combined(",
            "ssm/mamba_mixer.py: the fused conv1d + chunked SSD scan (Triton) of _ssm_training",
            must_exist=False,
        ),
        AttributePatch(
            "megatron.core.ssm.mamba_mixer",
            "mamba_chunk_scan_combined",
            "omni_train.platform.kernels.mamba:mamba_chunk_scan_combined",
            "y = mamba_chunk_scan_combined(",
            "ssm/mamba_mixer.py: the chunked SSD scan (Triton) of the static-inference prefill "
            "(_ssm_prefill), unbound without mamba-ssm; it returns the final state for the cache",
            must_exist=False,
        ),
        AttributePatch(
            "megatron.core.ssm.mamba_mixer",
            "ExtendedRMSNorm",
            "omni_train.platform.kernels.mamba:TorchGatedRMSNorm",
            "self.norm = ExtendedRMSNorm(",
            "ssm/mamba_mixer.py: the gated RMSNorm subclasses mamba-ssm's Triton RMSNormGated",
        ),
        AttributePatch(
            "megatron.core.ssm.mamba_mixer",
            "_check_mamba_sequence_packing_support",
            _torch_mamba_packing_support,
            "mamba_ssm >= ",
            "ssm/mamba_mixer.py: packed sequences are gated on mamba-ssm/causal-conv1d "
            "versions; the PyTorch kernels honour seq_idx",
        ),
    ),
)

TORCH_OPTIMIZER = PatchSet(
    "torch_optimizer",
    "megatron's optimizer is torch.optim (neither TE nor apex FusedAdam used)",
    attributes=(
        AttributePatch(
            "megatron.core.optimizer.distrib_optimizer",
            "DistributedOptimizer.load_state_dict",
            _restore_adam_steps,
            's["step"] = step',
            "optimizer/distrib_optimizer.py: torch.optim path restores AdamW steps as 0 (and "
            "shared)",
            wraps=True,
        ),
    ),
    sources=(
        SourcePatch(
            "megatron.core.optimizer.distrib_optimizer",
            "DistributedOptimizer.state_dict",
            'for s in inner_state_dict["state"].values()]))',
            'for s in inner_state_dict["state"].values()])) or [0.0]',
            "optimizer/distrib_optimizer.py: on the torch.optim path state_dict() asserts one "
            "'step' value, but a never-stepped optimizer has none; loading a checkpoint builds "
            "its state dict on exactly such an optimizer",
        ),
    ),
)

PATCH_SETS = (NO_TRANSFORMER_ENGINE, NO_MAMBA_SSM, TORCH_OPTIMIZER)


def provide_tensor_ops() -> PatchReport:
    """Register the pure-PyTorch tensor ops under megatron's name if its Triton module cannot
    be imported (no triton): ``ssm.mamba_mixer`` imports it at module level. Training never
    calls them, so a GPU host's Triton module may stay even on the CPU device."""
    report = PatchReport()
    try:
        importlib.import_module(tensor_ops.MODULE)
    except ImportError:
        sys.modules[tensor_ops.MODULE] = tensor_ops
        report.applied.append(f"module {tensor_ops.MODULE} (pure PyTorch)")
    return report
