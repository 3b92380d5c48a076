"""megatron-core module specs for the hybrid LM stack, one per platform, same parameter names.

GPU: Transformer Engine layers (fused norm+linear, TE attention, TE grouped-GEMM experts) and
mamba-ssm mixers, as megatron-core's own ``mamba_stack_spec``.
CPU: the same megatron layer classes (TransformerLayer, MLPLayer, MoETransformerLayer,
SelfAttention, MLP, MoELayer) with pure-PyTorch leaves from :mod:`omni_train.model.cpu_layers`.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
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
from omni_train.model.cpu_layers import TorchNorm, TorchNormColumnParallelLinear
from omni_train.platform import Platform


def _stack(norm_linear, row_linear, norm, core_attention, moe, mamba_layer) -> ModuleSpec:
    return ModuleSpec(
        module=MambaStack,
        submodules=MambaStackSubmodules(
            mamba_layer=mamba_layer,
            attention_layer=ModuleSpec(
                module=TransformerLayer,
                submodules=TransformerLayerSubmodules(
                    self_attention=ModuleSpec(
                        module=SelfAttention,
                        params={"attn_mask_type": AttnMaskType.causal},
                        submodules=SelfAttentionSubmodules(
                            linear_qkv=norm_linear,
                            core_attention=core_attention,
                            linear_proj=row_linear,
                        ),
                    ),
                    self_attn_bda=get_bias_dropout_add,
                ),
            ),
            mlp_layer=ModuleSpec(
                module=MLPLayer,
                submodules=TransformerLayerSubmodules(
                    mlp=ModuleSpec(
                        module=MLP,
                        submodules=MLPSubmodules(linear_fc1=norm_linear, linear_fc2=row_linear),
                    ),
                    mlp_bda=get_bias_dropout_add,
                ),
            ),
            moe_layer=ModuleSpec(
                module=MoETransformerLayer,
                submodules=TransformerLayerSubmodules(
                    pre_mlp_layernorm=norm, mlp=moe, mlp_bda=get_bias_dropout_add
                ),
            ),
        ),
    )


def gpu_stack_spec(model: ModelConfig) -> ModuleSpec:
    """megatron-core's TE + mamba-ssm layers (requires transformer-engine and mamba-ssm)."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    mamba_layer = IdentityOp
    if "M" in model.hybrid_pattern:
        from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
        from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules

        mamba_layer = ModuleSpec(
            module=MambaLayer,
            submodules=MambaLayerSubmodules(
                mixer=ModuleSpec(
                    module=MambaMixer,
                    submodules=MambaMixerSubmodules(
                        in_proj=TELayerNormColumnParallelLinear, out_proj=TERowParallelLinear
                    ),
                ),
                mamba_bda=get_bias_dropout_add,
            ),
        )
    moe = get_moe_module_spec(
        use_te=True, num_experts=max(model.num_moe_experts, 1), moe_grouped_gemm=True
    )
    return _stack(
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
        TENorm,
        TEDotProductAttention,
        moe,
        mamba_layer,
    )


def cpu_stack_spec(model: ModelConfig) -> ModuleSpec:
    """The same stack from megatron's local layers and our pure-PyTorch TE stand-ins."""
    if "M" in model.hybrid_pattern:
        raise ValueError(
            f"model {model.name!r} has Mamba2 ('M') layers, which need the mamba-ssm kernels "
            "(GPU); the pure-PyTorch Mamba2 mixer for the CPU platform is not built yet "
            "(issue #3). Use a pattern of '*', '-' and 'E' on CPU."
        )
    moe = get_moe_module_spec(
        use_te=False, num_experts=max(model.num_moe_experts, 1), moe_grouped_gemm=False
    )
    return _stack(
        TorchNormColumnParallelLinear,
        RowParallelLinear,
        TorchNorm,
        DotProductAttention,
        moe,
        IdentityOp,
    )


def lm_stack_spec(model: ModelConfig, platform: Platform) -> ModuleSpec:
    if platform.is_cuda and platform.has_transformer_engine:
        return gpu_stack_spec(model)
    if platform.is_cuda:
        raise RuntimeError(
            "CUDA is present but Transformer Engine is not importable; run inside an NVIDIA "
            "PyTorch/NeMo container or install the [gpu] extra (see docs/gpu.md)"
        )
    return cpu_stack_spec(model)
