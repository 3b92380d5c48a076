"""Typed config: schema (per component), composition from recipes/, cross-field validation."""

from omni_train.config.checkpoint import CheckpointConfig
from omni_train.config.compose import compose_job, config_hash, to_dict
from omni_train.config.data import DataConfig
from omni_train.config.model import ModelConfig
from omni_train.config.parallel import ParallelConfig
from omni_train.config.schema import JobConfig, StageConfig
from omni_train.config.training import OptimizerConfig, TrainerConfig
from omni_train.config.validation import validate

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "JobConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "StageConfig",
    "TrainerConfig",
    "compose_job",
    "config_hash",
    "to_dict",
    "validate",
]
