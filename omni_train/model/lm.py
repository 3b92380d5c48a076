"""The hybrid Mamba2/attention/MoE language model ("Nemotron-H") on megatron-core's MambaModel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.activations import squared_relu
from megatron.core.models.mamba import MambaModel
from megatron.core.transformer import TransformerConfig

from omni_train.config import JobConfig
from omni_train.model.specs import lm_stack_spec
from omni_train.parallel import ParallelState
from omni_train.platform import Platform

_ACTIVATIONS = {
    "squared_relu": (squared_relu, False),
    "gelu": (F.gelu, False),
    "swiglu": (F.silu, True),
}


def transformer_config(cfg: JobConfig, platform: Platform) -> TransformerConfig:
    """Map our model + parallel + trainer config onto megatron-core's TransformerConfig."""
    m, p = cfg.model, cfg.parallel
    activation, gated = _ACTIVATIONS[m.activation]
    bf16 = cfg.trainer.precision == "bf16"
    has_moe = "E" in m.hybrid_pattern
    moe = {}
    if has_moe:
        moe = dict(
            num_moe_experts=m.num_moe_experts,
            moe_router_topk=m.moe_router_topk,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=m.moe_shared_expert_ffn_hidden_size or None,
            moe_router_score_function=m.moe_router_score_function,
            moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
            moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
            moe_router_load_balancing_type="seq_aux_loss",
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_router_dtype="fp32" if m.moe_router_fp32 else None,
            moe_token_dispatcher_type=p.moe_token_dispatcher,
            moe_grouped_gemm=platform.has_transformer_engine,
            moe_permute_fusion=False,
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        ffn_hidden_size=m.ffn_hidden_size,
        activation_func=activation,
        gated_linear_unit=gated,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_eps,
        add_bias_linear=m.add_bias_linear,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        mamba_num_heads=m.mamba_num_heads or None,
        mamba_head_dim=m.mamba_head_dim,
        mamba_state_dim=m.mamba_state_dim,
        mamba_num_groups=m.mamba_num_groups,
        tensor_model_parallel_size=p.tp,
        sequence_parallel=p.sp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.expert_tp,
        pipeline_model_parallel_size=p.pp,
        # CPU init draws each full weight from the CPU RNG before slicing it, so TP layouts
        # start from identical global weights; on GPU weights are initialised in place.
        use_cpu_initialization=not platform.is_cuda,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Loss is a sum over real tokens; megatron divides gradients by the global token count.
        calculate_per_token_loss=True,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=platform.is_cuda,
        gradient_accumulation_fusion=False,
        **moe,
    )


def build_language_model(
    cfg: JobConfig, ps: ParallelState, platform: Platform
) -> tuple[MambaModel, TransformerConfig]:
    tf_config = transformer_config(cfg, platform)
    model = MambaModel(
        config=tf_config,
        mamba_stack_spec=lm_stack_spec(cfg.model, platform),
        vocab_size=cfg.model.vocab_size,
        max_sequence_length=cfg.trainer.seq_length,
        hybrid_override_pattern=cfg.model.hybrid_pattern,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type="none",  # Nemotron-H: no positional embedding
        pg_collection=ps.pg,
    )
    return model.to(platform.device), tf_config
