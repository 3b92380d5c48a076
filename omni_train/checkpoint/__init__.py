"""Checkpoints: torch_dist (megatron dist_checkpointing) for state, manifest.json for humans and
for the next stage.

``io`` (save, load, resume) imports megatron-core (about 4.5 s); the launcher's pre-flight checks
use only ``layout``, ``manifest``, ``integrity`` and ``lock``, which import none of it.
"""

from omni_train.checkpoint.layout import checkpoints_dir, find_latest
from omni_train.checkpoint.manifest import (
    check_model_fingerprint,
    read_manifest,
    versions,
    write_manifest,
)

__all__ = [
    "check_model_fingerprint",
    "checkpoints_dir",
    "find_latest",
    "read_manifest",
    "versions",
    "write_manifest",
]
