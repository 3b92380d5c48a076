"""Model config: the LM, the two encoders, the projectors, the media tokens (recipes in
``recipes/model/``). Per-field checks only; cross-field checks live in
:mod:`omni_train.config.validation`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import MISSING

from omni_train.config.checks import positive

# Layer symbols of the hybrid pattern (megatron.core.ssm.mamba_hybrid_layer_allocation.Symbols).
LAYER_SYMBOLS = {"M": "Mamba2 mixer", "*": "self-attention", "-": "dense MLP", "E": "MoE"}


@dataclass
class VisionConfig:
    """The RADIO ViT vision encoder (C-RADIOv4-H in the published model).

    Images keep their aspect ratio; the data side resizes each to a patch grid with an even
    number of rows and columns and ``min_patches <= rows*cols <= max_patches``; the 2x2 pixel
    shuffle then makes one LM token per 2x2 patches. Video frames are paired into Conv3D
    tubelets of ``tubelet_frames`` frames (an odd last frame is duplicated).
    """

    num_layers: int = 32
    hidden_size: int = 1280
    num_attention_heads: int = 16
    ffn_hidden_size: int = 5120
    norm_eps: float = 1e-6
    patch_size: int = 16
    max_image_size: int = 2048  # px per side covered by the learned CPE grid
    num_class_tokens: int = 10  # class + register tokens per image, dropped before projection
    min_patches: int = 1024
    max_patches: int = 13312
    tubelet_frames: int = 2  # 1: every frame through the 2D patch embedder
    video_patch_budgets: list[int] = field(default_factory=lambda: [256, 512, 768, 1024])
    init_method_std: float = 0.02
    # Where megatron-core's RADIOViTModel and the released model (transformers' `radio` /
    # `nemotron_h_omni`, the reference for weights) differ; defaults follow the release.
    # The CPE grid is resized with bilinear interpolation; megatron-core uses
    # align_corners=True, the reference False (and so does the training-time random crop here).
    cpe_align_corners: bool = False
    # A learned LayerNorm after the last ViT block (megatron's `ln_post`). The release has none
    # (the reference adds a non-learned one only when the LM has MTP layers, which omni-train
    # refuses), so its features go to the pixel shuffle as the last block leaves them.
    final_layernorm: bool = False

    def __post_init__(self) -> None:
        positive(
            "model.vision",
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size,
            patch_size=self.patch_size,
            min_patches=self.min_patches,
            max_patches=self.max_patches,
            tubelet_frames=self.tubelet_frames,
        )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.vision.hidden_size={self.hidden_size} must be a multiple of "
                f"model.vision.num_attention_heads={self.num_attention_heads}"
            )
        if self.max_image_size % self.patch_size:
            raise ValueError(
                f"model.vision.max_image_size={self.max_image_size} must be a multiple of "
                f"model.vision.patch_size={self.patch_size}"
            )
        if self.min_patches > self.max_patches or self.min_patches < 4:
            raise ValueError(
                f"model.vision.min_patches={self.min_patches} must be >= 4 (one 2x2 shuffle "
                f"group) and <= max_patches={self.max_patches}"
            )
        if self.tubelet_frames not in (1, 2):
            raise ValueError(f"model.vision.tubelet_frames={self.tubelet_frames}; valid: 1, 2")
        if not self.video_patch_budgets or min(self.video_patch_budgets) < 4:
            raise ValueError(
                f"model.vision.video_patch_budgets={self.video_patch_budgets} needs at least one "
                "budget, each >= 4 patches"
            )

    @property
    def grid_size(self) -> int:
        """Rows (= columns) of the learned position-embedding grid."""
        return self.max_image_size // self.patch_size


@dataclass
class AudioConfig:
    """NeMo's FastConformer encoder and mel preprocessor (Parakeet-TDT-0.6B-v2's encoder).

    Field names follow NeMo's ``ConformerEncoder`` / ``AudioToMelSpectrogramPreprocessor``.
    """

    num_layers: int = 24
    d_model: int = 1024
    num_heads: int = 8
    ff_expansion_factor: int = 4
    conv_kernel_size: int = 9
    subsampling: str = "dw_striding"
    subsampling_factor: int = 8
    subsampling_conv_channels: int = 256
    self_attention_model: str = "rel_pos"
    pos_emb_max_len: int = 5000
    # The released Parakeet encoder (transformers `parakeet_encoder`: scale_input=False,
    # attention_bias=convolution_bias=False) has no input x-scaling and no biases on its
    # attention, feed-forward and conv modules; NeMo's defaults (true, true) add 442,368
    # parameters to the full-size encoder. The subsampling convolutions keep their biases.
    xscaling: bool = False
    untie_biases: bool = True
    use_bias: bool = False
    conv_norm_type: str = "batch_norm"
    dropout: float = 0.1  # NeMo applies it to the pre-encoder, attention and residual paths
    # mel preprocessor
    sample_rate: int = 16000
    num_mel_bins: int = 128
    window_size: float = 0.025
    window_stride: float = 0.01
    n_fft: int = 512
    dither: float = 1e-5  # NeMo's; applied in training only
    # data.layout=report cuts a stream into clips of this length (the last clip holds the
    # remainder), each one encoder input; data.layout=processor keeps a stream whole
    clip_seconds: float = 30.0
    # Shorter streams are skipped when a sample is planned (reason audio_too_short). None: the
    # shortest stream the encoder can take (min_samples: two encoder frames, 0.08 s at 16 kHz
    # with a 10 ms hop and 8x subsampling). One frame alone in a micro-batch leaves the
    # conformer's BatchNorm one value per channel, which training cannot normalise; the
    # released processor takes any length. A value raises the floor, never lowers it.
    min_seconds: float | None = None

    def __post_init__(self) -> None:
        positive(
            "model.audio",
            num_layers=self.num_layers,
            d_model=self.d_model,
            num_heads=self.num_heads,
            ff_expansion_factor=self.ff_expansion_factor,
            subsampling_conv_channels=self.subsampling_conv_channels,
            sample_rate=self.sample_rate,
            num_mel_bins=self.num_mel_bins,
            clip_seconds=self.clip_seconds,
        )
        if self.min_seconds is not None and self.min_seconds > self.clip_seconds:
            raise ValueError(
                f"model.audio.min_seconds={self.min_seconds} must be at most clip_seconds="
                f"{self.clip_seconds}"
            )
        if (
            self.min_seconds is not None
            and self.min_seconds * self.sample_rate < self.floor_samples
        ):
            raise ValueError(
                f"model.audio.min_seconds={self.min_seconds} is below what the encoder can "
                f"take in training ({self.floor_samples / self.sample_rate:g} s: two encoder "
                "frames); set it higher, or null for that floor"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.audio.d_model={self.d_model} must be a multiple of "
                f"model.audio.num_heads={self.num_heads}"
            )
        if self.subsampling != "dw_striding" or self.subsampling_factor not in (2, 4, 8, 16):
            raise ValueError(
                f"model.audio.subsampling={self.subsampling!r} x{self.subsampling_factor}: "
                "only 'dw_striding' with a factor of 2, 4, 8 or 16 is supported (the token "
                "accounting in omni_train.data.tokens follows its length arithmetic)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.audio.dropout={self.dropout} must be in [0, 1)")

    @property
    def hop_samples(self) -> int:
        return round(self.window_stride * self.sample_rate)

    @property
    def floor_samples(self) -> int:
        """The shortest stream the encoder takes: ``1 + n // hop`` mel frames become two
        encoder frames after ``dw_striding`` from ``subsampling_factor x hop`` samples on (the
        STFT's reflect padding needs more than ``n_fft / 2``, always fewer)."""
        return max(self.subsampling_factor * self.hop_samples, self.n_fft // 2 + 1)

    @property
    def min_samples(self) -> int:
        """Streams shorter than this are skipped (``min_seconds``, or the encoder's floor)."""
        if self.min_seconds is None:
            return self.floor_samples
        return max(self.floor_samples, math.ceil(self.min_seconds * self.sample_rate))


@dataclass
class MediaTokenConfig:
    """Placeholder token ids: one placeholder per projected media feature.

    They must match the tokenizer's special tokens (the data pipeline checks that).
    """

    image: int = 10
    video: int = 11
    audio: int = 12


@dataclass
class ModelConfig:
    """The omni model: the hybrid LM (top-level fields), encoders and projectors.

    LM dimensions follow megatron-core's TransformerConfig names where one exists. ``vision``
    and ``audio`` are optional: a model without them is a text-only LM.
    """

    name: str = MISSING
    hybrid_pattern: str = MISSING  # one symbol per layer, see LAYER_SYMBOLS
    hidden_size: int = MISSING
    vocab_size: int = MISSING
    # attention
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING  # GQA key/value groups
    head_dim: int = MISSING
    # dense MLP ("-" layers)
    ffn_hidden_size: int = MISSING
    # MoE ("E" layers)
    num_moe_experts: int = 0
    moe_router_topk: int = 1
    moe_ffn_hidden_size: int = 0
    moe_shared_expert_ffn_hidden_size: int = 0  # 0: no shared expert
    moe_router_score_function: str = "sigmoid"  # "sigmoid" | "softmax"
    moe_router_enable_expert_bias: bool = True  # aux-loss-free balancing
    moe_router_topk_scaling_factor: float = 1.0
    moe_aux_loss_coeff: float = 1e-4  # sequence-level aux loss
    moe_router_fp32: bool = True
    # Mamba2 ("M" layers)
    mamba_num_heads: int = 0
    mamba_head_dim: int = 64
    mamba_state_dim: int = 128
    mamba_num_groups: int = 8
    mamba_conv_kernel: int = 4
    # softplus(dt + dt_bias) is clamped below at this value, as the released model does
    # (transformers `nemotron_h`: time_step_limit = (time_step_min, inf)); megatron-core does not
    # clamp: 0 reproduces megatron's behaviour.
    mamba_dt_clamp_min: float = 1e-3
    activation: str = "squared_relu"  # "squared_relu" | "gelu" | "swiglu"
    normalization: str = "RMSNorm"  # "RMSNorm" | "LayerNorm"
    norm_eps: float = 1e-5
    add_bias_linear: bool = False
    untie_embeddings: bool = True
    init_method_std: float = 0.02
    # encoders and projectors (RMSNorm -> Linear -> squared ReLU -> Linear, no bias)
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    vision_projector_ffn_hidden_size: int = 0
    audio_projector_ffn_hidden_size: int = 0
    projector_norm_eps: float = 1e-5  # the projectors' RMSNorm (fixed at 1e-5 in the release)
    # The projectors' init std (None: init_method_std). megatron's 0.02 suits inputs thousands
    # wide; a projector 32 wide with a squared ReLU would start out passing ~1e-3 of the text
    # embeddings' scale, and its modality would be ignored (model=tiny sets it).
    projector_init_method_std: float | None = None
    media_tokens: MediaTokenConfig = field(default_factory=MediaTokenConfig)
    # `model=hf model.hf_path=DIR`: every field above is derived from DIR/config.json (the omni
    # model, its LM, RADIO or Parakeet; omni_train/hf/config.py); command-line
    # `model.*` overrides still win. Not part of the model fingerprint.
    hf_path: str | None = None

    def __post_init__(self) -> None:
        if self.hybrid_pattern is MISSING or self.name is MISSING:
            return  # a partially filled node during composition
        unknown = sorted(set(self.hybrid_pattern) - set(LAYER_SYMBOLS))
        if unknown or not self.hybrid_pattern:
            valid = ", ".join(f"'{k}' ({v})" for k, v in LAYER_SYMBOLS.items())
            raise ValueError(
                f"model.hybrid_pattern={self.hybrid_pattern!r} has unknown symbols {unknown}; "
                f"use only {valid}"
            )
        positive(
            "model",
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            head_dim=self.head_dim,
            ffn_hidden_size=self.ffn_hidden_size,
            norm_eps=self.norm_eps,
        )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_query_groups={self.num_query_groups} (GQA)"
            )
        if "E" in self.hybrid_pattern:
            positive(
                "model",
                num_moe_experts=self.num_moe_experts,
                moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                moe_router_topk=self.moe_router_topk,
            )
            if self.moe_router_topk > self.num_moe_experts:
                raise ValueError(
                    f"model.moe_router_topk={self.moe_router_topk} exceeds "
                    f"model.num_moe_experts={self.num_moe_experts}"
                )
        elif self.num_moe_experts:
            raise ValueError(
                f"model.num_moe_experts={self.num_moe_experts} but hybrid_pattern has no 'E' "
                "layer; set num_moe_experts=0 or add E layers"
            )
        if "M" in self.hybrid_pattern:
            positive(
                "model",
                mamba_num_heads=self.mamba_num_heads,
                mamba_head_dim=self.mamba_head_dim,
                mamba_state_dim=self.mamba_state_dim,
                mamba_num_groups=self.mamba_num_groups,
                mamba_conv_kernel=self.mamba_conv_kernel,
            )
            if self.mamba_num_heads % self.mamba_num_groups:
                raise ValueError(
                    f"model.mamba_num_heads={self.mamba_num_heads} must be a multiple of "
                    f"model.mamba_num_groups={self.mamba_num_groups}"
                )
        if self.mamba_dt_clamp_min < 0:
            raise ValueError(
                f"model.mamba_dt_clamp_min={self.mamba_dt_clamp_min} must be >= 0 (0: no clamp)"
            )
        positive("model", projector_norm_eps=self.projector_norm_eps)
        if self.projector_init_method_std is not None:
            positive("model", projector_init_method_std=self.projector_init_method_std)
        for encoder, ffn in (
            ("vision", self.vision_projector_ffn_hidden_size),
            ("audio", self.audio_projector_ffn_hidden_size),
        ):
            if getattr(self, encoder) is not None and ffn <= 0:
                raise ValueError(
                    f"model.{encoder} is set but model.{encoder}_projector_ffn_hidden_size="
                    f"{ffn}; give the projector's hidden size"
                )
        ids = [self.media_tokens.image, self.media_tokens.video, self.media_tokens.audio]
        if len(set(ids)) != 3 or not all(0 <= i < self.vocab_size for i in ids):
            raise ValueError(
                f"model.media_tokens={ids} must be three distinct ids below "
                f"model.vocab_size={self.vocab_size}"
            )
        for name, value, valid in (
            ("activation", self.activation, ("squared_relu", "gelu", "swiglu")),
            ("normalization", self.normalization, ("RMSNorm", "LayerNorm")),
            ("moe_router_score_function", self.moe_router_score_function, ("sigmoid", "softmax")),
        ):
            if value not in valid:
                raise ValueError(f"model.{name}={value!r}; valid: {', '.join(valid)}")

    @property
    def num_layers(self) -> int:
        return len(self.hybrid_pattern)

    @property
    def parts(self) -> list[str]:
        """Named parts a stage may run in eval mode while their component trains."""
        return ["vision_encoder.cpe"] if self.vision is not None else []

    @property
    def components(self) -> list[str]:
        """Component names this model declares, for the per-stage freezing policy."""
        names = ["llm"]
        if self.vision is not None:
            names += ["vision_encoder", "vision_projector"]
        if self.audio is not None:
            names += ["audio_encoder", "audio_projector"]
        return names
