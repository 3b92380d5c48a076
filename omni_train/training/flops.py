"""Model FLOPs of a micro-batch, from what it holds: the LM over each packed segment, the ViT
over each image and tubelet, the conformer over each audio clip, the projectors over their
features. Pure arithmetic on the config and the batch geometry (``tests/test_flops.py`` checks
each formula against a hand count).

Conventions (stated, because MFU figures depend on them):

- 2 FLOPs per multiply-add; matrix products only (norms, activations, softmax, the
  Mamba conv's and gates' elementwise work, embeddings and gathers are left out);
- attention in the LM is causal within each packed segment: ``L (L + 1) / 2`` query-key pairs for
  ``QK^T`` and as many for ``AV`` (``2 * heads * head_dim`` FLOPs each); the ViT's and the
  conformer's attention is full within an image / clip;
- the Mamba2 scan is counted as its recurrence: per token and head, the state update
  ``dt * x B^T`` and the read-out ``C h`` (``3 * head_dim * state`` multiply-adds with the
  decay), whatever chunking the kernel uses;
- MoE: the router, the top-k routed experts and the shared expert per token (not gated:
  squared ReLU, two matrices each);
- backward: the gradient with respect to activations costs one forward where something before
  the component trains (the LM: anything trains; a projector: its encoder trains; an encoder:
  it trains itself), the gradient with respect to weights one forward where the component
  trains, except where it trains LoRA adapters only (``peft``: its base weights get no
  gradient; the adapters' own products, rank ``r`` against the hidden sizes, are left out).
  **Model FLOPs** = forward + that backward; **hardware FLOPs** add the forward of every
  recomputed part (activation recompute runs it twice).

Which components train and which parts are recomputed is the stage's :class:`FlopsPolicy`,
built from the config by the stage runner and passed to the forward step
(:func:`omni_train.training.forward_step.make_forward_step`).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from omni_train.config import JobConfig
from omni_train.config.model import AudioConfig, ModelConfig, VisionConfig
from omni_train.config.training import RecomputeConfig

# ---- forward FLOPs per component --------------------------------------------------------------


def mamba_token(m: ModelConfig) -> float:
    d_inner = m.mamba_num_heads * m.mamba_head_dim
    groups_state = m.mamba_num_groups * m.mamba_state_dim
    in_proj = m.hidden_size * (2 * d_inner + 2 * groups_state + m.mamba_num_heads)
    scan = 3 * d_inner * m.mamba_state_dim
    return 2.0 * (in_proj + scan + d_inner * m.hidden_size)


def attention_projections_token(m: ModelConfig) -> float:
    q, kv = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    return 2.0 * (m.hidden_size * (q + 2 * kv) + q * m.hidden_size)


def causal_attention_core(m: ModelConfig, length: int) -> float:
    """QK^T and AV over one packed segment of ``length`` tokens (causal)."""
    pairs = length * (length + 1) / 2
    return 2 * 2.0 * pairs * m.num_attention_heads * m.head_dim


def moe_token(m: ModelConfig) -> float:
    h = m.hidden_size
    routed = m.moe_router_topk * 2 * h * m.moe_ffn_hidden_size
    shared = 2 * h * m.moe_shared_expert_ffn_hidden_size
    return 2.0 * (h * m.num_moe_experts + routed + shared)


def dense_mlp_token(m: ModelConfig) -> float:
    return 2.0 * 2 * m.hidden_size * m.ffn_hidden_size


def lm_forward(m: ModelConfig, lengths: list[int]) -> dict[str, float]:
    """Forward FLOPs of the LM over packed segments of ``lengths`` tokens, by part."""
    tokens = sum(lengths)
    count = {s: m.hybrid_pattern.count(s) for s in "M*-E"}
    return {
        "mamba": count["M"] * tokens * mamba_token(m),
        "attention_projections": count["*"] * tokens * attention_projections_token(m),
        "attention_core": count["*"] * sum(causal_attention_core(m, n) for n in lengths),
        "mlp": count["-"] * tokens * dense_mlp_token(m),
        "moe": count["E"] * tokens * moe_token(m),
        "output_layer": tokens * 2.0 * m.hidden_size * m.vocab_size,
    }


def vit_forward(v: VisionConfig, pieces: list[tuple[int, int]]) -> float:
    """ViT FLOPs for pieces ``(patches, frames)``: an image (1 frame) or a tubelet."""
    h, f = v.hidden_size, v.ffn_hidden_size
    total = 0.0
    for patches, frames in pieces:
        n = patches + v.num_class_tokens
        embed = 2.0 * patches * frames * 3 * v.patch_size**2 * h
        per_layer = 2.0 * n * (3 * h * h + h * h + 2 * h * f) + 2 * 2.0 * n * n * h
        total += embed + v.num_layers * per_layer
    return total


def projector_forward(d_in: int, ffn: int, d_out: int, tokens: int) -> float:
    return 2.0 * tokens * (d_in * ffn + ffn * d_out)


def _conv_out(length: int) -> int:
    return (length - 1) // 2 + 1  # kernel 3, stride 2, padding 1


def conformer_forward(a: AudioConfig, frames: list[int]) -> float:
    """Conformer FLOPs over clips of ``frames`` mel frames each (dw_striding subsampling)."""
    d, c, k = a.d_model, a.subsampling_conv_channels, a.conv_kernel_size
    stages = int(math.log2(a.subsampling_factor))
    total = 0.0
    for t in frames:
        time, freq = _conv_out(t), _conv_out(a.num_mel_bins)
        sub = 2.0 * time * freq * c * 9  # the first, full 3x3 convolution (1 -> c channels)
        for _ in range(stages - 1):  # depthwise 3x3 + pointwise 1x1
            time, freq = _conv_out(time), _conv_out(freq)
            sub += 2.0 * time * freq * c * (9 + c)
        sub += 2.0 * time * c * freq * d  # the linear out
        n = time
        ff = 2 * 2.0 * n * 2 * d * a.ff_expansion_factor * d  # two macaron feed-forwards
        attn = 2.0 * n * 4 * d * d + 2.0 * (2 * n - 1) * d * d  # q, k, v, out; positions
        attn += 3 * 2.0 * n * n * d  # content and position scores, AV
        conv = 2.0 * n * (2 * d * d + k * d + d * d)
        total += sub + a.num_layers * (ff + attn + conv)
    return total


# ---- a micro-batch ----------------------------------------------------------------------------


@dataclass
class Geometry:
    """What a micro-batch holds, as the FLOPs count needs it."""

    segment_lengths: list[int]  # LM tokens per packed segment (or per row)
    vit_pieces: list[tuple[int, int]]  # (patches, frames) per image / tubelet
    vision_features: int  # projected vision tokens
    audio_frames: list[int]  # mel frames per audio clip
    audio_features: int  # projected audio tokens


@dataclass
class StepFlops:
    model: float
    hardware: float


def step_flops(
    m: ModelConfig,
    g: Geometry,
    trainable: Collection[str],
    recompute: RecomputeConfig,
    adapted: Collection[str] = (),
) -> StepFlops:
    """Model and hardware FLOPs of one micro-batch (see the module docstring); ``adapted``:
    the components that train LoRA adapters instead of their weights."""
    trains = set(trainable)
    weights = trains - set(adapted)
    lm = lm_forward(m, g.segment_lengths)
    parts: list[tuple[float, bool, bool, float]] = []  # (fwd, act grad, weight grad, recomputed)
    lm_total = sum(lm.values())
    recomputed = 0.0
    if "core_attn" in recompute.lm:
        recomputed += lm["attention_core"]
    if "moe" in recompute.lm:
        recomputed += lm["moe"]
    if "mlp" in recompute.lm:
        recomputed += lm["mlp"]
    parts.append((lm_total, bool(trains), "llm" in weights, recomputed))
    if m.vision is not None and g.vit_pieces:
        vit = vit_forward(m.vision, g.vit_pieces)
        proj = projector_forward(
            4 * m.vision.hidden_size,
            m.vision_projector_ffn_hidden_size,
            m.hidden_size,
            g.vision_features,
        )
        encoder_trains = "vision_encoder" in trains
        parts.append((vit, encoder_trains, "vision_encoder" in weights,
                      vit if recompute.vision_encoder else 0))  # fmt: skip
        trains_projector = "vision_projector" in weights
        parts.append((proj, encoder_trains, trains_projector, proj if recompute.projectors else 0))
    if m.audio is not None and g.audio_frames:
        conf = conformer_forward(m.audio, g.audio_frames)
        proj = projector_forward(
            m.audio.d_model, m.audio_projector_ffn_hidden_size, m.hidden_size, g.audio_features
        )
        encoder_trains = "audio_encoder" in trains
        parts.append((conf, encoder_trains, "audio_encoder" in weights,
                      conf if recompute.audio_encoder else 0))  # fmt: skip
        trains_projector = "audio_projector" in weights
        parts.append((proj, encoder_trains, trains_projector, proj if recompute.projectors else 0))
    model = sum(f * (1 + act + weight) for f, act, weight, _ in parts)
    return StepFlops(model, model + sum(r for *_, r in parts))


@dataclass(frozen=True)
class FlopsPolicy:
    """What a step's FLOPs count takes from the stage besides the model and the micro-batch:
    the components that train (``stage.trainable``: which backward passes run), those of them
    that train LoRA adapters (``peft``: no weight gradients) and ``recompute`` (which forwards
    run twice)."""

    trainable: tuple[str, ...]
    recompute: RecomputeConfig
    adapted: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: JobConfig) -> FlopsPolicy:
        return cls(tuple(cfg.stage.trainable), cfg.recompute, cfg.peft.components)

    def count(self, m: ModelConfig, g: Geometry) -> StepFlops:
        """Model and hardware FLOPs of one micro-batch of geometry ``g`` (:func:`step_flops`)."""
        return step_flops(m, g, self.trainable, self.recompute, self.adapted)


# measured or vendor bf16 dense peaks per GPU, TFLOP/s (logging.peak_tflops overrides)
PEAK_TFLOPS = {
    "H100": 989.0,  # SXM, bf16 dense (vendor)
    "H200": 989.0,  # bf16 dense (vendor; 790 measured for an 8192^3 matmul on a lent H200)
    "A100": 312.0,
    "B200": 2250.0,
    "L40S": 362.0,
}


def device_peak_tflops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name (e.g. ``NVIDIA H100 80GB HBM3``), else None."""
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
