"""Typed configuration, one dataclass per component, registered as Hydra structured configs.

Per-field checks live in ``__post_init__`` (they run when Hydra converts the composed config to
objects); checks that relate several fields live in :mod:`omni_train.config.validation`.
Recipes under ``recipes/`` only hold values for these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

# Layer symbols of the hybrid pattern (megatron.core.ssm.mamba_hybrid_layer_allocation.Symbols).
LAYER_SYMBOLS = {"M": "Mamba2 mixer", "*": "self-attention", "-": "dense MLP", "E": "MoE"}
# megatron-core selective-recompute modules the LM uses (TransformerConfig.recompute_modules)
RECOMPUTE_LM_MODULES = ("core_attn", "mlp", "layernorm", "moe")


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


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
        _positive(
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
    # Shorter streams are skipped when a sample is planned (reason audio_too_short): Parakeet
    # is trained on 0.5 s .. 20 min, and a stream of one or two encoder frames breaks the
    # conformer's BatchNorm in training when it is the only clip of a micro-batch.
    min_seconds: float = 0.5

    def __post_init__(self) -> None:
        _positive(
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
        if self.min_seconds < 0 or self.min_seconds > self.clip_seconds:
            raise ValueError(
                f"model.audio.min_seconds={self.min_seconds} must be in [0, clip_seconds="
                f"{self.clip_seconds}]"
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
    # model, its LM, RADIO or Parakeet; omni_train/checkpoint/hf/config.py); command-line
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
        _positive(
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
            _positive(
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
            _positive(
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
        _positive("model", projector_norm_eps=self.projector_norm_eps)
        if self.projector_init_method_std is not None:
            _positive("model", projector_init_method_std=self.projector_init_method_std)
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


@dataclass
class ParallelConfig:
    """How the job is laid out. The data-parallel size is derived: world / (tp x cp x pp)."""

    tp: int = 1
    sp: bool = False  # sequence parallel (needs tp > 1 to mean anything)
    cp: int = 1
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel; None: same as tp (megatron's default)
    pp: int = 1  # pipeline parallel: fixed at 1 for now
    moe_token_dispatcher: str = "alltoall"  # "alltoall" | "allgather"
    distributed_optimizer: bool = True
    # How Transformer Engine's attention exchanges keys/values over the CP group (GPU):
    # p2p (ring), all_gather, a2a (megatron-core's cp_comm_type). The CPU platform all-gathers.
    cp_comm_type: str = "p2p"

    def __post_init__(self) -> None:
        _positive("parallel", tp=self.tp, cp=self.cp, ep=self.ep, etp=self.expert_tp, pp=self.pp)
        if self.pp != 1:
            raise ValueError(f"parallel.pp={self.pp}: pipeline parallelism is not supported; set 1")
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(
                f"parallel.moe_token_dispatcher={self.moe_token_dispatcher!r}; "
                "valid: alltoall, allgather"
            )
        if self.cp_comm_type not in ("p2p", "all_gather", "a2a"):
            raise ValueError(
                f"parallel.cp_comm_type={self.cp_comm_type!r}; valid: p2p, all_gather, a2a"
            )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.cp * self.pp)


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr``."""

    name: str = "adamw"
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_fraction: float = 0.1  # of trainer.train_steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0: no clipping
    decay_style: str = "cosine"
    # Multiplies lr and min_lr (the schedule's shape is unchanged). Only the tiny CPU overlay
    # (recipes/scale/tiny) sets it: a 1M-parameter model on a few thousand samples needs far
    # larger steps than the published 30B recipe, whose lr values stay as published.
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.name != "adamw":
            raise ValueError(f"optimizer.name={self.name!r}; only 'adamw' is supported")
        if self.decay_style != "cosine":
            raise ValueError(f"optimizer.decay_style={self.decay_style!r}; only 'cosine'")
        _positive("optimizer", lr=self.lr, lr_scale=self.lr_scale)
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr} must lie in [0, lr={self.lr}]")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optimizer.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optimizer.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("optimizer.weight_decay and optimizer.clip_grad must be >= 0")


@dataclass
class TrainerConfig:
    train_steps: int = 10
    micro_batch_size: int = 1  # sequences per forward pass per data-parallel rank
    global_batch_size: int = 1  # sequences per optimizer step over all data-parallel ranks
    seq_length: int = 128
    log_interval: int = 1
    save_interval: int = 0  # 0: save only at the end of the stage
    eval_iters: int = 2  # micro-batches of held-out data evaluated at the end
    eval_interval: int = 0  # also evaluate every this many steps (0: only at the end)
    eval_at_start: bool = False  # also evaluate before the first step (checks a handoff)
    # Stop this run (with a checkpoint) after this many steps, as a time-limited allocation
    # would; a later run resumes. 0: run to train_steps. The LR schedule is unaffected.
    exit_after_steps: int = 0
    seed: int = 1234
    precision: str = "bf16"  # "bf16" | "fp32"
    # Initialise every weight full-size from the CPU RNG and slice it per TP rank, so TP=1 and
    # TP=2 start from the same model on GPU too (the CPU always does). false: megatron's
    # per-rank GPU init, faster for 30B when the weights come from a checkpoint anyway.
    tp_invariant_init: bool = True

    def __post_init__(self) -> None:
        _positive(
            "trainer",
            train_steps=self.train_steps,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            seq_length=self.seq_length,
            log_interval=self.log_interval,
        )
        if min(self.save_interval, self.eval_iters, self.exit_after_steps, self.eval_interval) < 0:
            raise ValueError(
                "trainer.save_interval, trainer.eval_iters, trainer.eval_interval and "
                "trainer.exit_after_steps must be >= 0"
            )
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"trainer.precision={self.precision!r}; valid: bf16, fp32")


@dataclass
class CheckpointConfig:
    """Where the stage writes, and where it starts from.

    ``resume`` restores everything of an interrupted run of *this* stage from ``output_dir``
    (weights, optimizer, scheduler, RNG, data position, step). ``init_from`` starts a fresh run
    from another checkpoint's *weights only*. When both could apply, resume wins.
    """

    output_dir: str = "runs/${stage.name}"
    init_from: str | None = None
    # Stage 0's pretrained components: component name -> a torch_dist checkpoint holding that
    # component's weights under its own prefix (e.g. llm.*); every other component keeps its
    # initialisation. Importing the published HF/NeMo checkpoints into this form comes later.
    init_components: dict[str, str] = field(default_factory=dict)
    # Before init_from: the source must be the completed final checkpoint of stage.previous
    # with the same model fingerprint. false skips these checks (logged).
    check_handoff: bool = True
    # Resume from output_dir's newest *intact* checkpoint (omni_train.stage.resume):
    # "auto": if there is one; a damaged newer one is set aside with a warning;
    # "strict": there must be one and the newest checkpoint must be it (damaged: stop);
    # "true": there must be one; "false": never (a folder with checkpoints is refused).
    resume: str = "auto"
    # Start this stage over in a folder that holds a run (checkpoints, or a completed or
    # interrupted manifest): its checkpoints and manifest move to superseded-<time>/, never
    # deleted. Without it such a folder is resumed, or refused when nothing in it is intact.
    start_over: bool = False
    # A resume whose schedule settings (train steps, LR, warmup, decay, batch) differ from the
    # checkpoint's: "refuse" (say what changed and stop), "keep" (continue the checkpoint's
    # schedule), "rescale" (the new settings from the current step on).
    on_schedule_change: str = "refuse"
    # What the integrity record digests: the first and last 256 KiB of every file with its
    # size ("head_tail"), or every byte ("full": a resume check then reads the checkpoint).
    integrity: str = "head_tail"
    keep_last: int = 2  # older step checkpoints are deleted; 0 keeps all

    def __post_init__(self) -> None:
        if str(self.resume).lower() not in RESUME_MODES:
            raise ValueError(f"checkpoint.resume={self.resume!r}; valid: {', '.join(RESUME_MODES)}")
        self.resume = str(self.resume).lower()
        if self.on_schedule_change not in SCHEDULE_CHANGE:
            raise ValueError(
                f"checkpoint.on_schedule_change={self.on_schedule_change!r}; valid: "
                f"{', '.join(SCHEDULE_CHANGE)}"
            )
        if self.integrity not in ("head_tail", "full"):
            raise ValueError(f"checkpoint.integrity={self.integrity!r}; valid: head_tail, full")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 0")
        if self.start_over and self.resume in ("true", "strict"):
            raise ValueError(
                f"checkpoint.start_over=true and checkpoint.resume={self.resume} contradict each "
                "other: start over (resume=auto) or resume (start_over=false)"
            )


RESUME_MODES = ("auto", "strict", "true", "false")
SCHEDULE_CHANGE = ("refuse", "keep", "rescale")


@dataclass
class LoggingConfig:
    """Where the per-step scalars go besides the console and the manifest (rank 0 writes).

    wandb runs offline unless ``WANDB_MODE`` is set (``WANDB_MODE=online`` with
    ``WANDB_API_KEY``); TensorBoard event files go to ``tensorboard_dir`` (default
    ``<output_dir>/tensorboard``). ``peak_tflops``: the per-GPU peak MFU is measured against;
    None takes the device's entry in ``omni_train.training.flops.PEAK_TFLOPS`` (no MFU on CPU).
    """

    wandb: bool = False
    wandb_project: str = "omni-train"
    wandb_group: str | None = None  # default: the curriculum's run name, else the output folder
    wandb_dir: str | None = None  # default: the stage's output folder
    tensorboard: bool = False
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None

    def __post_init__(self) -> None:
        if self.peak_tflops is not None:
            _positive("logging", peak_tflops=self.peak_tflops)


@dataclass
class TokenizerConfig:
    """A Hugging Face tokenizer folder and the spelling of the tokens the sample layout uses.

    Defaults are the released model's vocabulary (transformers 5.23 ``nemotron_h_omni``
    processor). Every name except ``video`` must be one token of the tokenizer (checked at
    start-up). ``video`` is only the text placeholder a video part renders as before the layout
    expands it: the release has no video token, its frames use the image placeholder.
    """

    path: str = "tiny"  # a local tokenizer folder, or "tiny": the test tokenizer omni-train ships
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"  # the end-of-turn token: it carries loss after an assistant turn
    pad: str = "<pad>"
    # one placeholder per projected media feature; ids must equal model.media_tokens
    image: str = "<image>"
    video: str = "<video>"
    audio: str = "<so_embedding>"
    # markers around each placeholder run (video frame groups use the image markers)
    image_start: str = "<img>"
    image_end: str = "</img>"
    audio_start: str = "<so_start>"
    audio_end: str = "<so_end>"
    think_start: str = "<think>"
    think_end: str = "</think>"


@dataclass
class PackingConfig:
    """Online sequence packing (issue #5; docs/packing.md): samples become THD packed sequences
    of ``trainer.seq_length`` tokens, one per micro-batch (``trainer.micro_batch_size=1``;
    ``trainer.global_batch_size`` counts packed sequences).

    ``balance``: ``global`` (every data-parallel rank plans the same sample stream and packs the
    same bins, then keeps only the bins dealt to it, so the bins of one step cost the same on
    every rank; each sample is *decoded* once, by its rank, but every rank reads and plans
    every sample); ``local`` (each rank packs its own share of the stream, no cross-rank
    balance, no extra reading).
    """

    enabled: bool = False
    buffer_size: int = 1000  # samples planned ahead, per data worker (not decoded: small)
    # Planned samples (their media still encoded: bytes as read) kept in each data worker's
    # memory until their bin is decoded, so a bin's samples are not read and planned a second
    # time. Past the cap, and for the buffer a resumed stage restores, samples are fetched
    # again by their energon restore keys (the same sample, planned the same way). 0: always.
    plan_cache_mib: int = 256
    balance: str = "global"
    min_fill: float = 0.95  # a bin is emitted once this full; emptier ones wait for samples
    max_wait: int = 4  # repacks a sample may wait before its bin is emitted however full
    # Every sample is padded to a multiple of this many tokens. None: what the layout needs
    # (2 x cp, x tp under sequence parallel; 1 without CP). Set it to compare layouts on
    # identical bins (padding changes what fits), or to keep bins fixed across a CP change.
    sample_pad_multiple: int | None = None
    # Pad every packed sequence to exactly trainer.seq_length tokens (fixed shapes). Needed by
    # megatron's allgather MoE dispatcher under EP > 1: it gathers equal-sized token blocks from
    # ranks that hold different packed sequences. Costs the padding's compute.
    pad_to_capacity: bool = False
    # relative compute per sample (omni_train.data.packing.CostWeights; production defaults)
    attention_weight: float = 7.7e-6  # per token^2 of a sample
    vision_weight: float = 0.83  # per image/video token
    audio_weight: float = 0.19  # per audio token

    def __post_init__(self) -> None:
        if self.balance not in ("global", "local"):
            raise ValueError(f"data.packing.balance={self.balance!r}; valid: global, local")
        _positive("data.packing", buffer_size=self.buffer_size, max_wait=self.max_wait)
        if self.plan_cache_mib < 0:
            raise ValueError(f"data.packing.plan_cache_mib={self.plan_cache_mib} must be >= 0")
        if self.sample_pad_multiple is not None:
            _positive("data.packing", sample_pad_multiple=self.sample_pad_multiple)
        if not 0.0 < self.min_fill <= 1.0:
            raise ValueError(f"data.packing.min_fill={self.min_fill} must be in (0, 1]")
        for name in ("attention_weight", "vision_weight", "audio_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.packing.{name}={getattr(self, name)} must be >= 0")


LAYOUTS = ("processor", "report")


@dataclass
class DataConfig:
    """Where micro-batches come from.

    ``kind: synthetic``: learnable token sequences, no files (the text-only smoke stage).
    ``kind: energon``: conversations with media from megatron-energon datasets, chosen by
    ``blend`` (a file in ``data_blends/``) whose ``${...}`` dataset variables are set in
    ``paths``, or by ``path`` (one prepared energon dataset or metadataset).
    """

    kind: str = "synthetic"
    # How a sample becomes tokens (docs/data_format.md). "processor": exactly the input ids and
    # pixels of the released processor (transformers' NemotronH_Omni_Reasoning_V3Processor),
    # what HF/vLLM serving feeds the model: each audio stream is one encoder input, a video's
    # audio follows its frames. "report": the technical report's training layout: 30 s audio
    # clips, a video's audio interleaved with its frames in time, per-video patch budgets drawn
    # from model.vision.video_patch_budgets; the same markers and frame labels otherwise.
    layout: str = "processor"
    blend: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    # Dataset root of `omni-train data synth`; with `blend`, every blend variable not in
    # `paths` points at the matching synthetic category under it (data_blends/synthetic.yaml).
    synthetic_root: str | None = None
    # What synthetic_root holds (omni-train data synth --flavour): "general" conversations, or
    # "learn": the learnability tasks (omni_train/datatools/learn_tasks.py), which the
    # curriculum's answer probe scores. The curriculum makes the root when it is missing.
    synthetic_flavour: str = "general"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    num_workers: int = 2  # decoding processes per data-parallel rank (0: in the main process)
    shuffle_buffer_size: int = 100  # samples; 0 reads shards in order
    max_samples_per_sequence: int = 100  # samples read in a row from one shard; 0: whole shard
    video_fps: float = 2.0  # frames sampled per second of video
    max_video_frames: int = 64  # more frames than this: spread evenly over the video
    # A sample is skipped (and counted, per reason) when it cannot be used; the stage stops
    # when the skipped share of samples read exceeds this, once `skip_check_min_samples` have
    # been read (a few early bad samples must not stop a stage).
    max_skip_fraction: float = 0.01
    skip_check_min_samples: int = 200
    eval_split: str = "val"
    # A sample longer than trainer.seq_length: "skip" it (counted as too_long), or "truncate" it
    # at a text boundary (media items past the cut are dropped, never cut in half).
    over_long: str = "skip"
    packing: PackingConfig = field(default_factory=PackingConfig)

    def __post_init__(self) -> None:
        if self.over_long not in ("skip", "truncate"):
            raise ValueError(f"data.over_long={self.over_long!r}; valid: skip, truncate")
        if self.layout not in LAYOUTS:
            raise ValueError(f"data.layout={self.layout!r}; valid: {', '.join(LAYOUTS)}")
        if self.synthetic_flavour not in ("general", "learn"):
            raise ValueError(
                f"data.synthetic_flavour={self.synthetic_flavour!r}; valid: general, learn"
            )
        if self.kind not in ("synthetic", "energon"):
            raise ValueError(f"data.kind={self.kind!r}; valid: synthetic, energon")
        if self.kind == "energon" and (self.blend is None) == (self.path is None):
            raise ValueError(
                "data.kind=energon needs exactly one of data.blend (a data_blends/ name) and "
                "data.path (a prepared energon dataset or metadataset)"
            )
        if self.num_workers < 0 or self.shuffle_buffer_size < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer_size must be >= 0")
        if self.max_samples_per_sequence < 0 or self.skip_check_min_samples < 0:
            raise ValueError(
                "data.max_samples_per_sequence and data.skip_check_min_samples must be >= 0"
            )
        _positive("data", video_fps=self.video_fps, max_video_frames=self.max_video_frames)
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"data.max_skip_fraction={self.max_skip_fraction} must be in [0, 1]")


@dataclass
class StageConfig:
    """What a stage is and what trains in it (the stage recipes in ``recipes/stage/``).

    ``index``/``previous`` place a curriculum stage in its order: a stage with ``previous`` set
    starts (``checkpoint.init_from``) from that stage's completed final checkpoint, and the
    runner checks the name, the status and the model fingerprint before it loads anything.
    """

    name: str = MISSING
    description: str = ""
    index: int | None = None  # position in the curriculum (0-6); None: a stand-alone stage
    previous: str | None = None  # the stage whose final weights this one starts from
    # Components that train (a closed list: the names the model declares); the rest are
    # frozen: no gradient, no optimizer state, no DDP buffer.
    trainable: list[str] = field(default_factory=lambda: ["llm"])
    # Parts that run in eval mode while their component trains (e.g. vision_encoder.cpe: the
    # CPE's random crop off). omni_train.model.omni.PARTS lists them.
    eval_parts: list[str] = field(default_factory=list)
    # Frozen encoders run in eval mode (no CPE crop, no dropout, BatchNorm on its running
    # statistics, which then stay as loaded). false: train mode, as megatron's freeze does.
    frozen_encoders_eval: bool = True

    def __post_init__(self) -> None:
        if self.index is not None and self.index < 0:
            raise ValueError(f"stage.index={self.index} must be >= 0")
        if len(set(self.trainable)) != len(self.trainable):
            raise ValueError(f"stage.trainable={self.trainable} lists a component twice")


@dataclass
class RecomputeConfig:
    """Activation recompute per component (memory for compute; results are identical).

    ``lm``: megatron-core selective recompute of the LM's ``core_attn``, ``mlp``, ``layernorm``
    (the MoE layers' pre-MLP norm; attention and MLP norms are fused into their linears) and
    ``moe`` (the whole MoE layer). ``vision_encoder``: megatron's full recompute of every ViT
    block (``uniform``, one layer per unit). ``audio_encoder`` and ``projectors``: our own
    per-layer checkpointing of the NeMo conformer layers and of the projector MLPs.
    """

    lm: list[str] = field(default_factory=list)
    vision_encoder: bool = False
    audio_encoder: bool = False
    projectors: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.lm) - set(RECOMPUTE_LM_MODULES))
        if unknown:
            raise ValueError(
                f"recompute.lm={self.lm} has unknown modules {unknown}; valid: "
                f"{', '.join(RECOMPUTE_LM_MODULES)}"
            )


@dataclass
class ClusterConfig:
    """The machines a recipe is laid out for. With ``nodes`` set, the job must run on exactly
    ``nodes x gpus_per_node`` ranks (the global batch and data-parallel size assume it);
    ``nodes: null`` accepts any world size (local and CI runs)."""

    name: str = "local"
    nodes: int | None = None
    gpus_per_node: int = 8
    gpu: str = ""  # e.g. H100-80GB: picks the bf16 peak for time estimates (training.flops)
    # Memory of one GPU as the framework can use it (nvidia-smi's total): the planner's verdict
    # (`omni-train plan`, printed by `omni-train run`) is against it. None: no verdict.
    gpu_memory_gib: float | None = None

    def __post_init__(self) -> None:
        if self.nodes is not None:
            _positive("cluster", nodes=self.nodes)
        _positive("cluster", gpus_per_node=self.gpus_per_node)
        if self.gpu_memory_gib is not None:
            _positive("cluster", gpu_memory_gib=self.gpu_memory_gib)

    @property
    def world_size(self) -> int | None:
        return None if self.nodes is None else self.nodes * self.gpus_per_node


@dataclass
class JobConfig:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
