"""The job's typed configuration: :class:`JobConfig`, registered as a Hydra structured config
(:mod:`omni_train.config.compose`), with the stage and cluster sections.

Each component's section lives in its own module: ``model``, ``parallel``, ``training``
(optimizer, trainer, recompute, logging), ``checkpoint``, ``data``. Per-field checks live in
``__post_init__`` (they run when Hydra converts the composed config to objects); checks that
relate several fields live in :mod:`omni_train.config.validation`. Recipes under ``recipes/``
only hold values for these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from omni_train.config.checkpoint import CheckpointConfig
from omni_train.config.checks import positive
from omni_train.config.data import DataConfig
from omni_train.config.model import ModelConfig
from omni_train.config.parallel import ParallelConfig
from omni_train.config.peft import PeftConfig
from omni_train.config.training import (
    LoggingConfig,
    OptimizerConfig,
    RecomputeConfig,
    TrainerConfig,
)


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
            positive("cluster", nodes=self.nodes)
        positive("cluster", gpus_per_node=self.gpus_per_node)
        if self.gpu_memory_gib is not None:
            positive("cluster", gpu_memory_gib=self.gpu_memory_gib)

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
    peft: PeftConfig = field(default_factory=PeftConfig)
