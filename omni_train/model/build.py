"""Build the omni model's megatron-core modules from the typed config.

One ``TransformerConfig`` per transformer (LM, ViT, each projector); they share the precision,
tensor-parallel and initialisation settings. Only the LM runs sequence parallel: the encoders and
projectors see whole media items and are tensor parallel (ViT, projectors) or not (the audio
encoder, whose clips are shared out over the TP ranks: ``omni_train.model.omni``).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core.activations import squared_relu
from megatron.core.models.mamba import MambaModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer import TransformerConfig

from omni_train.config import JobConfig
from omni_train.model import recompute
from omni_train.model.audio import AudioEncoder
from omni_train.model.omni import OmniModel
from omni_train.model.specs import Leaves, lm_stack_spec, mlp_submodules, vit_layer_spec
from omni_train.model.vision import RadioEncoder
from omni_train.parallel import ParallelState
from omni_train.platform import Platform

_ACTIVATIONS = {
    "squared_relu": (squared_relu, False),
    "gelu": (F.gelu, False),
    "swiglu": (F.silu, True),
}


def _common(cfg: JobConfig, platform: Platform, init: bool) -> dict:
    bf16 = cfg.trainer.precision == "bf16"
    return dict(
        perform_initialization=init,
        tensor_model_parallel_size=cfg.parallel.tp,
        pipeline_model_parallel_size=cfg.parallel.pp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # CPU init draws each full weight from the CPU RNG before slicing it, so every TP layout
        # starts from identical global weights, on every platform (then the model moves to the
        # device). Off: megatron's per-rank init on the GPU (faster at 30B scale; weights then
        # depend on the TP layout, which does not matter when they come from a checkpoint).
        use_cpu_initialization=cfg.trainer.tp_invariant_init or not platform.is_cuda,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        # Loss is a sum over real tokens; megatron divides gradients by the global token count.
        calculate_per_token_loss=True,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=platform.has_transformer_engine,
        gradient_accumulation_fusion=False,
    )


def transformer_config(cfg: JobConfig, platform: Platform, init: bool = True) -> TransformerConfig:
    """The LM's TransformerConfig (also the one DDP and the optimizer are configured with)."""
    m, p = cfg.model, cfg.parallel
    activation, gated = _ACTIVATIONS[m.activation]
    moe = {}
    if "E" in m.hybrid_pattern:
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
            moe_grouped_gemm=platform.experts == "te_grouped",
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
        init_method_std=m.init_method_std,
        mamba_num_heads=m.mamba_num_heads or None,
        mamba_head_dim=m.mamba_head_dim,
        mamba_state_dim=m.mamba_state_dim,
        mamba_num_groups=m.mamba_num_groups,
        sequence_parallel=p.sp,
        context_parallel_size=p.cp,
        cp_comm_type=p.cp_comm_type,  # TE attention (GPU); the CPU attention all-gathers
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.expert_tp,
        **_common(cfg, platform, init),
        **moe,
        **recompute.lm_options(cfg.recompute),
    )


def vision_transformer_config(
    cfg: JobConfig, platform: Platform, init: bool = True
) -> TransformerConfig:
    """RADIO ViT-H: pre-LayerNorm blocks with biases, exact GELU; TP without SP."""
    v = cfg.model.vision
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        activation_func=F.gelu,
        gated_linear_unit=False,
        normalization="LayerNorm",
        layernorm_epsilon=v.norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        init_method_std=v.init_method_std,
        sequence_parallel=False,
        **_common(cfg, platform, init),
        **recompute.vision_options(cfg.recompute),
    )


def projector_transformer_config(
    cfg: JobConfig, platform: Platform, ffn_hidden_size: int, init: bool = True
) -> TransformerConfig:
    """RMSNorm(in) -> Linear(in, ffn) -> squared ReLU -> Linear(ffn, LM hidden), no bias."""
    m = cfg.model
    return TransformerConfig(
        num_layers=1,
        hidden_size=m.hidden_size,
        num_attention_heads=cfg.parallel.tp,  # unused; must be a multiple of TP
        ffn_hidden_size=ffn_hidden_size,
        activation_func=squared_relu,
        gated_linear_unit=False,
        normalization="RMSNorm",
        layernorm_epsilon=m.projector_norm_eps,
        add_bias_linear=False,
        init_method_std=m.projector_init_method_std or m.init_method_std,
        sequence_parallel=False,
        **_common(cfg, platform, init),
    )


def build_omni_model(
    cfg: JobConfig, ps: ParallelState, platform: Platform, leaves: Leaves, init: bool = True
) -> tuple[OmniModel, TransformerConfig]:
    """All components: megatron's on the CPU (CPU platform) or the current CUDA device, NeMo's
    on the CPU; the caller moves the model to the platform device. ``init=False`` skips
    megatron's weight initialisation (for meta-device builds)."""
    m = cfg.model
    tf_config = transformer_config(cfg, platform, init)
    llm = MambaModel(
        config=tf_config,
        mamba_stack_spec=lm_stack_spec(m, leaves),
        vocab_size=m.vocab_size,
        max_sequence_length=cfg.trainer.seq_length,
        hybrid_override_pattern=m.hybrid_pattern,
        share_embeddings_and_output_weights=not m.untie_embeddings,
        position_embedding_type="none",  # Nemotron-H: no positional embedding
        # OmniModel splices media into the full-length embeddings, then scatters for SP.
        scatter_embedding_sequence_parallel=False,
        pg_collection=ps.pg,
    )
    parts = {}
    if m.vision is not None:
        parts["vision_encoder"] = RadioEncoder(
            vision_transformer_config(cfg, platform, init),
            m.vision,
            vit_layer_spec(leaves),
            leaves.norm,
            pg_collection=ps.pg,
        )
        parts["vision_projector"] = MultimodalProjector(
            projector_transformer_config(cfg, platform, m.vision_projector_ffn_hidden_size, init),
            mlp_submodules(leaves),
            projector_type="mlp",
            input_size=4 * m.vision.hidden_size,  # after the 2x2 pixel shuffle
            tp_group=ps.pg.tp,
        )
    if m.audio is not None:
        parts["audio_encoder"] = AudioEncoder(m.audio, init)
        parts["audio_projector"] = MultimodalProjector(
            projector_transformer_config(cfg, platform, m.audio_projector_ffn_hidden_size, init),
            mlp_submodules(leaves),
            projector_type="mlp",
            input_size=m.audio.d_model,
            tp_group=ps.pg.tp,
        )
    model = OmniModel(m, llm, **parts)
    if init and tf_config.use_cpu_initialization:
        tp_invariant_mamba_init(model, cfg.trainer.seed, ps.tp_rank, ps.tp)
    if tf_config.bf16:
        model = model.bfloat16()  # the NeMo encoder is built in fp32
    return model, tf_config


def tp_invariant_mamba_init(model: torch.nn.Module, seed: int, tp_rank: int, tp: int) -> None:
    """Re-draw MambaMixer's parameters from full-size (global) tensors, sliced per TP rank.

    With CPU initialisation megatron draws every weight full-size and slices it, so any TP
    layout starts from the same model — except in the mixer: ``conv1d``, ``dt_bias`` and
    ``A_log`` are drawn per rank from the TP-local RNG, and ``in_proj`` (whose output is the
    concatenation z | x | B | C | dt) is sliced in contiguous rows, while each rank's slice
    means its own z | x | B | C | dt blocks. This re-draws them with megatron's distributions
    (in_proj normal(0, init_method_std); dt log-uniform in [1e-3, 0.1] floored at 1e-4 through
    an inverse softplus; A uniform in [1, 16]; conv1d weight and bias uniform +-1/sqrt(kernel))
    and slices them in megatron's checkpoint layout (every block split over TP ranks).
    """
    from megatron.core.ssm.mamba_mixer import MambaMixer

    for name, mixer in model.named_modules():
        if not isinstance(mixer, MambaMixer):
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        heads = mixer.nheads_local_tp * tp
        d_inner, gn = mixer.d_inner_local_tp * tp, mixer.ngroups_local_tp * tp * mixer.d_state
        k = mixer.conv1d.weight.shape[-1]

        def local_heads(t: torch.Tensor) -> torch.Tensor:
            return t.chunk(tp)[tp_rank]

        def local_blocks(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
            return torch.cat([part.chunk(tp)[tp_rank] for part in t.split(sizes)])

        in_sizes = [d_inner, d_inner, gn, gn, heads]  # z, x, B, C, dt
        std = mixer.config.init_method_std
        in_proj = torch.randn(sum(in_sizes), mixer.d_model, generator=g) * std

        lo, hi = math.log(1e-3), math.log(0.1)
        dt = torch.exp(torch.rand(heads, generator=g) * (hi - lo) + lo).clamp(min=1e-4)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        a_log = torch.log(torch.empty(heads).uniform_(1, 16, generator=g))
        bound = 1 / math.sqrt(k)
        weight = torch.empty(d_inner + 2 * gn, 1, k).uniform_(-bound, bound, generator=g)
        bias = torch.empty(d_inner + 2 * gn).uniform_(-bound, bound, generator=g)
        with torch.no_grad():
            mixer.dt_bias.copy_(local_heads(inv_dt))
            mixer.A_log.copy_(local_heads(a_log))
            mixer.in_proj.weight.copy_(local_blocks(in_proj, in_sizes))
            mixer.conv1d.weight.copy_(local_blocks(weight, [d_inner, gn, gn]))
            if mixer.conv1d.bias is not None:
                mixer.conv1d.bias.copy_(local_blocks(bias, [d_inner, gn, gn]))
