"""Model FLOPs (omni_train/training/flops.py) against hand counts on a small model, with the
arithmetic written out term by term."""

from __future__ import annotations

import pytest

from omni_train.config import compose_job
from omni_train.config.training import RecomputeConfig
from omni_train.training import flops


@pytest.fixture(scope="module")
def m():
    return compose_job(["model=tiny"]).model  # hidden 64, pattern M*EM-E, vocab 512


def test_lm_by_hand(m):
    # Mamba: in_proj 64 x (2*64 + 2*2*16 + 4) = 64 x 196; scan 3 x 64 x 16; out_proj 64 x 64
    mamba = 2 * (64 * 196 + 3 * 64 * 16 + 64 * 64)
    assert flops.mamba_token(m) == mamba
    # attention: q 4 x 16 = 64, kv 2 x 16 = 32: qkv 64 x (64 + 64), out 64 x 64
    assert flops.attention_projections_token(m) == 2 * (64 * 128 + 64 * 64)
    # causal core over 10 tokens: 55 query-key pairs, QK^T and AV, 4 heads x 16
    assert flops.causal_attention_core(m, 10) == 2 * 2 * 55 * 64
    # MoE: router 4 experts, top-2 experts of 64, shared expert of 128; 2 matrices each
    assert flops.moe_token(m) == 2 * (64 * 4 + 2 * 2 * 64 * 64 + 2 * 64 * 128)
    assert flops.dense_mlp_token(m) == 2 * 2 * 64 * 128
    parts = flops.lm_forward(m, [10, 6])  # two packed segments
    assert parts["mamba"] == 2 * 16 * mamba  # two M layers
    assert parts["attention_core"] == 2 * 2 * (55 + 21) * 64  # per segment, not 16^2
    assert parts["moe"] == 2 * 16 * flops.moe_token(m)
    assert parts["mlp"] == 16 * flops.dense_mlp_token(m)
    assert parts["output_layer"] == 16 * 2 * 64 * 512


def test_vit_by_hand(m):
    v = m.vision  # 2 layers, hidden 32, ffn 64, 2 class tokens, 16 px patches
    # one 2x3-patch image: 6 patches + 2 class tokens = 8 tokens
    embed = 2 * 6 * 3 * 256 * 32
    layer = 2 * 8 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 64) + 2 * 2 * 8 * 8 * 32
    assert flops.vit_forward(v, [(6, 1)]) == embed + 2 * layer
    # a tubelet of 2 frames: the embedder takes both frames' pixels
    assert flops.vit_forward(v, [(6, 2)]) == 2 * embed + 2 * layer


def test_conformer_by_hand(m):
    a = m.audio  # d 32, 16 channels, ff x2, kernel 9, 8x subsampling, 128 mel bins
    t = 100  # mel frames
    # conv0: 50 x 64 positions (time, frequency), 16 channels, 3x3
    sub = 2 * 50 * 64 * 16 * 9
    # two depthwise + pointwise stages: 25 x 32, then 13 x 16 positions
    sub += 2 * 25 * 32 * 16 * (9 + 16) + 2 * 13 * 16 * 16 * (9 + 16)
    sub += 2 * 13 * 16 * 16 * 32  # linear out: (16 channels x 16 bins) -> 32 per frame
    n = 13
    ff = 2 * 2 * n * 2 * 32 * 64
    attn = 2 * n * 4 * 32 * 32 + 2 * (2 * n - 1) * 32 * 32 + 3 * 2 * n * n * 32
    conv = 2 * n * (2 * 32 * 32 + 9 * 32 + 32 * 32)
    assert flops.conformer_forward(a, [t]) == sub + 2 * (ff + attn + conv)


def test_backward_and_recompute_rules(m):
    g = flops.Geometry([16], [(6, 1)], 2, [100], 13)
    lm = sum(flops.lm_forward(m, [16]).values())
    vit = flops.vit_forward(m.vision, [(6, 1)])
    vproj = flops.projector_forward(128, m.vision_projector_ffn_hidden_size, 64, 2)
    conf = flops.conformer_forward(m.audio, [100])
    aproj = flops.projector_forward(32, m.audio_projector_ffn_hidden_size, 64, 13)
    # stage 0-like: only the vision projector trains. LM: activation grads (3 x fwd would
    # also count weight grads): 2x; projector: weight grads only (its encoder is frozen): 2x;
    # frozen encoders and the frozen audio projector: forward only
    got = flops.step_flops(m, g, ["vision_projector"], RecomputeConfig())
    assert got.model == 2 * lm + vit + 2 * vproj + conf + aproj
    assert got.hardware == got.model
    # everything trains: 3x forward everywhere; recompute adds one forward of what it redoes
    everything = ["llm", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector"]
    recompute = RecomputeConfig(lm=["core_attn"], vision_encoder=True)
    got = flops.step_flops(m, g, everything, recompute)
    assert got.model == 3 * (lm + vit + vproj + conf + aproj)
    assert got.hardware == got.model + flops.lm_forward(m, [16])["attention_core"] + vit
    # LoRA on the LM and the ViT (peft): activation grads through them, no weight grads; the
    # projectors and the conformer train whole
    got = flops.step_flops(m, g, everything, RecomputeConfig(), ["llm", "vision_encoder"])
    assert got.model == 2 * (lm + vit) + 3 * (vproj + conf + aproj)


def test_peak_table():
    assert flops.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.device_peak_tflops("cpu") is None
