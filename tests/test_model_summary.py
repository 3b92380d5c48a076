"""`omni-train model summary`: meta-device build, counts equal closed-form formulas.

The formulas below are written from the architecture spec, independently of the model code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from omni_train.config import compose_job


def lm_params(m) -> tuple[int, int]:
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
    total = 2 * embedding + h + sum(per[s] for s in m.hybrid_pattern)  # in/out + final norm
    active_moe = moe_fixed + m.moe_router_topk * expert
    active_per = {**per, "E": active_moe}
    active = embedding + h + sum(active_per[s] for s in m.hybrid_pattern)  # output layer counts
    return total, active


def vision_params(m) -> int:
    v = m.vision
    h, f, p = v.hidden_size, v.ffn_hidden_size, v.patch_size
    layer = (2 * h + h * 3 * h + 3 * h) + (h * h + h) + (2 * h + h * f + f) + (f * h + h)
    patch_generator = (
        3 * p * p * h  # 2D patch embedder (no bias)
        + v.tubelet_frames * 3 * p * p * h  # Conv3D tubelet embedder
        + v.grid_size**2 * h  # CPE grid
        + v.num_class_tokens * h
    )
    final_norm = 2 * h if v.final_layernorm else 0  # the release has none
    return patch_generator + v.num_layers * layer + final_norm


def projector_params(d_in: int, ffn: int, d_out: int) -> int:
    return d_in + d_in * ffn + ffn * d_out  # RMSNorm, fc1, fc2; no bias


def conformer_params(a) -> int:
    d, c = a.d_model, a.subsampling_conv_channels
    freq = a.num_mel_bins
    for _ in range(3):  # three stride-2 stages (8x)
        freq = (freq - 1) // 2 + 1
    b = 1 if a.use_bias else 0  # attention / feed-forward / conv biases (none in the release)
    pre = (9 * c + c) + 2 * ((9 * c + c) + (c * c + c)) + (c * freq * d + d)  # always biased
    ff = d * a.ff_expansion_factor * d * 2 + b * (a.ff_expansion_factor * d + d)
    conv = (2 * d * d + b * 2 * d) + (a.conv_kernel_size * d + b * d) + 2 * d + (d * d + b * d)
    attn = 2 * d + 4 * (d * d + b * d) + d * d  # pos_bias_u/v, q/k/v/out, linear_pos (no bias)
    norms = 5 * 2 * d  # ff1, conv, self-attention, ff2, out LayerNorms
    return pre + a.num_layers * (2 * ff + conv + attn + norms)


def expected(model: str) -> dict:
    m = compose_job([f"model={model}"]).model
    total_lm, active = lm_params(m)
    comps = {
        "llm": total_lm,
        "vision_encoder": vision_params(m),
        "vision_projector": projector_params(
            4 * m.vision.hidden_size, m.vision_projector_ffn_hidden_size, m.hidden_size
        ),
        "audio_encoder": conformer_params(m.audio),
        "audio_projector": projector_params(
            m.audio.d_model, m.audio_projector_ffn_hidden_size, m.hidden_size
        ),
    }
    return {"components": comps, "total": sum(comps.values()), "active_per_token": active}


def _summary(model: str) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "model", "summary", f"model={model}", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout), time.perf_counter() - start


def test_published_model_summary_matches_spec_and_formulas():
    summary, elapsed = _summary("nano_omni_30b_a3b")
    want = expected("nano_omni_30b_a3b")
    assert summary["components"] == want["components"]
    assert summary["total"] == want["total"]
    assert summary["active_per_token"] == want["active_per_token"]
    assert summary["layers"] == {"M": 23, "*": 6, "-": 0, "E": 23}
    # The released checkpoint, exactly (../shared/spec/architecture.md, transformers 5.23).
    assert summary["components"] == {
        "llm": 31_577_937_344,
        "vision_encoder": 653_611_520,
        "vision_projector": 159_912_960,
        "audio_encoder": 608_879_616,
        "audio_projector": 15_205_376,
    }
    assert summary["total"] == 33_015_546_816
    # The spec's rounded figures: LM ~31.6B total / ~3.2B active, whole model ~33.0B.
    assert round(summary["components"]["llm"] / 1e9, 1) == 31.6
    assert round(summary["active_per_token"] / 1e9, 1) == 3.2
    assert round(summary["total"] / 1e9, 1) == 33.0
    assert elapsed < 60
    # No weights allocated: 33B fp32 parameters would be 132 GB; the build stays near 1 GB.
    assert summary["peak_rss_mib"] < 2048, f"peak RSS {summary['peak_rss_mib']} MiB"


def test_tiny_model_summary_matches_formulas():
    summary, _ = _summary("tiny")
    want = expected("tiny")
    assert summary["components"] == want["components"]
    assert summary["active_per_token"] == want["active_per_token"]
    assert set("M*E") <= {k for k, v in summary["layers"].items() if v}


def test_summary_table_output():
    out = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "model", "summary", "model=tiny"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("llm", "vision_encoder", "audio_projector", "total", "active per LM token"):
        assert name in out


@pytest.mark.parametrize("bad", ["model=nope", "model.vision.hidden_size=33"])
def test_summary_bad_config_is_one_line_error(bad):
    out = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "model", "summary", bad],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "omni-train: error:" in out.stderr and "Traceback" not in out.stderr
