"""Checkpoints: torch_dist (megatron dist_checkpointing) for state, manifest.json for humans and
for the next stage."""

from omni_train.checkpoint.io import (
    TrainState,
    check_resumable,
    find_latest,
    load_component_weights,
    load_for_resume,
    load_weights,
    save_checkpoint,
)
from omni_train.checkpoint.manifest import read_manifest, versions, write_manifest

__all__ = [
    "TrainState",
    "check_resumable",
    "find_latest",
    "load_component_weights",
    "load_for_resume",
    "load_weights",
    "read_manifest",
    "save_checkpoint",
    "versions",
    "write_manifest",
]
