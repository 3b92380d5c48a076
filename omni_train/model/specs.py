"""megatron-core module specs for every part of the model, leaves chosen by the platform.

With Transformer Engine (CUDA): TE layers (fused norm+linear, TE attention incl. THD packed
sequences, TE grouped-GEMM experts), as megatron-core's own ``mamba_stack_spec`` and
``get_vit_layer_with_transformer_engine_spec``.
Without it (the CPU, or CUDA without TE): the same megatron layer classes (TransformerLayer,
MLPLayer, MoETransformerLayer, MambaLayer, MambaMixer, SelfAttention, MLP, MoELayer) with
pure-PyTorch leaves from ``omni_train.platform.kernels`` (attention: SDPA on the CPU,
FlexAttention on CUDA). The Mamba2 kernels are mamba-ssm's or ours, chosen by the platform
(``omni_train.platform.standins``). Parameter names and shapes are the same everywhere, so
checkpoints move between platforms.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from omni_train.config import ModelConfig
from omni_train.platform import Platform
from omni_train.platform.kernels.attention import (
    FlexDotProductAttention,
    TorchDotProductAttention,
)
from omni_train.platform.kernels.layers import TorchNorm, TorchNormColumnParallelLinear


@dataclass(frozen=True)
class Leaves:
    """The platform-specific leaf modules every spec below is assembled from."""

    norm_linear: type  # norm fused into a column-parallel linear (param layer_norm_weight)
    row_linear: type
    norm: type
    core_attention: type  # handles packed (THD) sequences
    use_te: bool


def platform_leaves(platform: Platform) -> Leaves:
    """TE leaves where the platform uses Transformer Engine, pure-PyTorch leaves elsewhere."""
    if platform.linear == "te":
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return Leaves(
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
            TENorm,
            TEDotProductAttention,
            True,
        )
    attention = {"flex": FlexDotProductAttention, "sdpa": TorchDotProductAttention}
    return Leaves(
        TorchNormColumnParallelLinear,
        RowParallelLinear,
        TorchNorm,
        attention[platform.attention],
        False,
    )


def _attention_layer(leaves: Leaves, mask: AttnMaskType, mlp: ModuleSpec | None) -> ModuleSpec:
    """Self-attention (norm fused into qkv), then optionally an MLP (norm fused into fc1)."""
    with_mlp = {} if mlp is None else {"mlp": mlp, "mlp_bda": get_bias_dropout_add}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=leaves.norm_linear,
                    core_attention=leaves.core_attention,
                    linear_proj=leaves.row_linear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            **with_mlp,
        ),
    )


def mlp_submodules(leaves: Leaves) -> MLPSubmodules:
    """norm+fc1 (column parallel), fc2 (row parallel): dense MLPs and the projectors."""
    return MLPSubmodules(linear_fc1=leaves.norm_linear, linear_fc2=leaves.row_linear)


def lm_stack_spec(model: ModelConfig, leaves: Leaves) -> ModuleSpec:
    """MambaStack with the hybrid pattern's four layer kinds."""
    mamba_layer = IdentityOp
    if "M" in model.hybrid_pattern:
        # lazy: MambaMixer's module imports mamba-ssm (and its Triton kernels) where it is
        # installed (GPU); a pattern without Mamba layers never needs it.
        from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules

        from omni_train.model.mamba_mixer import ClampedDtMambaMixer  # lazy: as above

        mamba_layer = ModuleSpec(
            module=MambaLayer,
            submodules=MambaLayerSubmodules(
                mixer=ModuleSpec(
                    module=ClampedDtMambaMixer,
                    params={
                        "d_conv": model.mamba_conv_kernel,
                        "dt_clamp_min": model.mamba_dt_clamp_min,
                    },
                    submodules=MambaMixerSubmodules(
                        in_proj=leaves.norm_linear, out_proj=leaves.row_linear
                    ),
                ),
                mamba_bda=get_bias_dropout_add,
            ),
        )
    moe = get_moe_module_spec(
        use_te=leaves.use_te,
        num_experts=max(model.num_moe_experts, 1),
        moe_grouped_gemm=leaves.use_te,
    )
    dense = ModuleSpec(module=MLP, submodules=mlp_submodules(leaves))
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=mamba_layer,
            attention_layer=_attention_layer(leaves, AttnMaskType.causal, None),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(mlp=dense, mlp_bda=get_bias_dropout_add),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=leaves.norm, mlp=moe, mlp_bda=get_bias_dropout_add
                ),
            ),
        ),
    )


def vit_layer_spec(leaves: Leaves) -> ModuleSpec:
    """A pre-norm ViT block (LayerNorm fused into qkv and fc1), bidirectional attention.

    Packed images are separated by ``cu_seqlens`` (TE turns ``no_mask`` into ``padding`` for
    THD input; the CPU attention builds the block-diagonal mask).
    """
    mlp = ModuleSpec(module=MLP, submodules=mlp_submodules(leaves))
    return _attention_layer(leaves, AttnMaskType.no_mask, mlp)
