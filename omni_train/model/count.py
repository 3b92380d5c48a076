"""Parameter counts of a ``model`` config in closed form, from the architecture alone (no
torch, no megatron): the launcher sizes a checkpoint with them before it starts any process.
``tests/test_model_summary.py`` checks them against the model megatron builds, component by
component, for the tiny and the released model.
"""

from __future__ import annotations

from omni_train.config.model import AudioConfig, ModelConfig, VisionConfig


def lm_params(m: ModelConfig) -> tuple[int, int]:
    """(total, active per token) of the hybrid LM."""
    h = m.hidden_size
    d_inner = m.mamba_num_heads * m.mamba_head_dim
    conv_dim = d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim
    in_proj = h * (2 * d_inner + 2 * m.mamba_num_groups * m.mamba_state_dim + m.mamba_num_heads)
    mamba = (
        h  # norm fused into in_proj
        + in_proj
        + conv_dim * m.mamba_conv_kernel  # depthwise conv1d weight
        + conv_dim  # conv1d bias
        + 3 * m.mamba_num_heads  # dt_bias, A_log, D
        + d_inner  # gated RMSNorm weight
        + d_inner * h  # out_proj
    )
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    attention = h + h * (q + 2 * kv) + q * h
    dense = h + 2 * h * m.ffn_hidden_size
    expert = 2 * h * m.moe_ffn_hidden_size  # squared ReLU: not gated
    shared = 2 * h * m.moe_shared_expert_ffn_hidden_size
    router = m.num_moe_experts * h
    moe_fixed = h + router + shared
    moe = moe_fixed + m.num_moe_experts * expert
    per = {"M": mamba, "*": attention, "-": dense, "E": moe}
    embedding = m.vocab_size * h
    outputs = 2 if m.untie_embeddings else 1
    total = outputs * embedding + h + sum(per[s] for s in m.hybrid_pattern)  # + final norm
    active_moe = moe_fixed + m.moe_router_topk * expert
    active_per = {**per, "E": active_moe}
    active = embedding + h + sum(active_per[s] for s in m.hybrid_pattern)  # output layer counts
    return total, active


def vision_params(v: VisionConfig) -> int:
    h, f, p = v.hidden_size, v.ffn_hidden_size, v.patch_size
    layer = (2 * h + h * 3 * h + 3 * h) + (h * h + h) + (2 * h + h * f + f) + (f * h + h)
    patch_generator = (
        3 * p * p * h  # 2D patch embedder (no bias)
        + (v.tubelet_frames * 3 * p * p * h if v.tubelet_frames > 1 else 0)  # Conv3D tubelets
        + v.grid_size**2 * h  # CPE grid
        + v.num_class_tokens * h
    )
    final_norm = 2 * h if v.final_layernorm else 0  # the release has none
    return patch_generator + v.num_layers * layer + final_norm


def projector_params(d_in: int, ffn: int, d_out: int) -> int:
    return d_in + d_in * ffn + ffn * d_out  # RMSNorm, fc1, fc2; no bias


def conformer_params(a: AudioConfig) -> int:
    d, c = a.d_model, a.subsampling_conv_channels
    freq = a.num_mel_bins
    stages = a.subsampling_factor.bit_length() - 1  # stride-2 stages
    for _ in range(stages):
        freq = (freq - 1) // 2 + 1
    b = 1 if a.use_bias else 0  # attention / feed-forward / conv biases (none in the release)
    # dw_striding: a full 3x3 conv, then (depthwise 3x3 + pointwise 1x1) per further stage,
    # all biased, then the linear out
    pre = (9 * c + c) + (stages - 1) * ((9 * c + c) + (c * c + c)) + (c * freq * d + d)
    ff = d * a.ff_expansion_factor * d * 2 + b * (a.ff_expansion_factor * d + d)
    conv = (2 * d * d + b * 2 * d) + (a.conv_kernel_size * d + b * d) + 2 * d + (d * d + b * d)
    attn = 2 * d + 4 * (d * d + b * d) + d * d  # pos_bias_u/v, q/k/v/out, linear_pos (no bias)
    norms = 5 * 2 * d  # ff1, conv, self-attention, ff2, out LayerNorms
    return pre + a.num_layers * (2 * ff + conv + attn + norms)


def parameter_counts(m: ModelConfig) -> dict[str, int]:
    """Parameters per component (the names ``ModelConfig.components`` declares)."""
    out = {"llm": lm_params(m)[0]}
    if m.vision is not None:
        out["vision_encoder"] = vision_params(m.vision)
        out["vision_projector"] = projector_params(
            4 * m.vision.hidden_size, m.vision_projector_ffn_hidden_size, m.hidden_size
        )
    if m.audio is not None:
        out["audio_encoder"] = conformer_params(m.audio)
        out["audio_projector"] = projector_params(
            m.audio.d_model, m.audio_projector_ffn_hidden_size, m.hidden_size
        )
    return out
