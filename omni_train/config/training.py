"""Training config: optimizer, trainer loop, activation recompute, logging sinks."""

from __future__ import annotations

from dataclasses import dataclass, field

from omni_train.config.checks import positive

# megatron-core selective-recompute modules the LM uses (TransformerConfig.recompute_modules)
RECOMPUTE_LM_MODULES = ("core_attn", "mlp", "layernorm", "moe")


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
        positive("optimizer", lr=self.lr, lr_scale=self.lr_scale)
        if not 0.0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr} must lie in [0, lr={self.lr}]")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optimizer.warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optimizer.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError("optimizer.weight_decay and optimizer.clip_grad must be >= 0")


# what ``omni-train eval --metrics`` and ``trainer.eval_answers.metrics`` choose from
# (omni_train.inference.evaluate defines each)
ANSWER_METRICS = ("loss", "exact", "generate", "wer")


@dataclass
class AnswerEvalConfig:
    """Answer metrics at every evaluation (``trainer.eval_interval`` and the stage's end): the
    metrics of ``omni-train eval`` (:mod:`omni_train.inference.evaluate`) on a fixed set of
    held-out rows, in the training processes, on the weights being trained.

    The rows: the val split (``data.eval_split``) of ``data`` (a JSONL file, a converted
    dataset or a folder of them), or, when it is None, of every dataset the stage trains on,
    read once at the start; ``num_samples`` rows in all, spread evenly over the (source,
    category) groups, the first rows of each group in file order (the same rows at every
    evaluation and after a resume). ``categories``: only these categories (a row's ``task`` /
    ``category`` field, else its modality mix); empty: all. Generation is greedy, at most
    ``max_new_tokens`` per row, in batches of ``batch_size`` rows, with sequence parallelism
    switched off for its duration; it needs ``parallel.cp=1`` and ``parallel.pp=1``.
    """

    num_samples: int = 0  # 0: no answer metrics
    metrics: list[str] = field(default_factory=lambda: ["loss", "exact", "generate"])
    max_new_tokens: int = 16
    batch_size: int = 8
    data: str | None = None
    media: str | None = None  # a JSONL's media folder (default: the JSONL's own)
    categories: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"trainer.eval_answers.num_samples={self.num_samples} must be >= 0")
        positive(
            "trainer.eval_answers", max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
        )
        unknown = sorted(set(self.metrics) - set(ANSWER_METRICS))
        if unknown or not self.metrics:
            raise ValueError(
                f"trainer.eval_answers.metrics={list(self.metrics)}: unknown {unknown}; choose "
                f"from {', '.join(ANSWER_METRICS)}"
            )


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
    eval_answers: AnswerEvalConfig = field(default_factory=AnswerEvalConfig)
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
        positive(
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
            positive("logging", peak_tflops=self.peak_tflops)
