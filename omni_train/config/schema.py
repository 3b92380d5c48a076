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


def _positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{owner}.{name} must be > 0, got {value}")


@dataclass
class ModelConfig:
    """The language model (the encoders and projectors join in the model issue).

    Dimensions follow megatron-core's TransformerConfig names where one exists.
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
    # common
    activation: str = "squared_relu"  # "squared_relu" | "gelu" | "swiglu"
    normalization: str = "RMSNorm"  # "RMSNorm" | "LayerNorm"
    norm_eps: float = 1e-5
    add_bias_linear: bool = False
    untie_embeddings: bool = True
    init_method_std: float = 0.02

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
            _positive("model", mamba_num_heads=self.mamba_num_heads)
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

    def __post_init__(self) -> None:
        _positive("parallel", tp=self.tp, cp=self.cp, ep=self.ep, etp=self.expert_tp, pp=self.pp)
        if self.pp != 1:
            raise ValueError(f"parallel.pp={self.pp}: pipeline parallelism is not supported; set 1")
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(
                f"parallel.moe_token_dispatcher={self.moe_token_dispatcher!r}; "
                "valid: alltoall, allgather"
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

    def __post_init__(self) -> None:
        if self.name != "adamw":
            raise ValueError(f"optimizer.name={self.name!r}; only 'adamw' is supported")
        if self.decay_style != "cosine":
            raise ValueError(f"optimizer.decay_style={self.decay_style!r}; only 'cosine'")
        _positive("optimizer", lr=self.lr)
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
    eval_at_start: bool = False  # also evaluate before the first step (checks a handoff)
    # Stop this run (with a checkpoint) after this many steps, as a time-limited allocation
    # would; a later run resumes. 0: run to train_steps. The LR schedule is unaffected.
    exit_after_steps: int = 0
    seed: int = 1234
    precision: str = "bf16"  # "bf16" | "fp32"

    def __post_init__(self) -> None:
        _positive(
            "trainer",
            train_steps=self.train_steps,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            seq_length=self.seq_length,
            log_interval=self.log_interval,
        )
        if self.save_interval < 0 or self.eval_iters < 0 or self.exit_after_steps < 0:
            raise ValueError(
                "trainer.save_interval, trainer.eval_iters and trainer.exit_after_steps "
                "must be >= 0"
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
    resume: str = "auto"  # "auto": resume if output_dir has a checkpoint; "true": must; "false"
    keep_last: int = 2  # older step checkpoints are deleted; 0 keeps all

    def __post_init__(self) -> None:
        if str(self.resume).lower() not in ("auto", "true", "false"):
            raise ValueError(f"checkpoint.resume={self.resume!r}; valid: auto, true, false")
        self.resume = str(self.resume).lower()
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last={self.keep_last} must be >= 0")


@dataclass
class DataConfig:
    """Where micro-batches come from. The energon-backed omni data arrives with the data issue."""

    kind: str = "synthetic"

    def __post_init__(self) -> None:
        if self.kind != "synthetic":
            raise ValueError(f"data.kind={self.kind!r}; valid: synthetic")


@dataclass
class StageConfig:
    name: str = MISSING
    description: str = ""
    trainable: list[str] = field(default_factory=lambda: ["llm"])


@dataclass
class JobConfig:
    stage: StageConfig = field(default_factory=StageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
