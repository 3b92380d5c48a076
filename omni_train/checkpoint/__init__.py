"""Checkpoints: torch_dist (megatron dist_checkpointing) for state, manifest.json for humans and
for the next stage.

The megatron-backed names (``io``) load on first use, so the launcher's pre-flight checks
(``layout``, ``manifest``, ``lock``) run without importing megatron-core (several seconds).
"""

from omni_train.checkpoint.layout import checkpoints_dir, find_latest
from omni_train.checkpoint.manifest import read_manifest, versions, write_manifest

_IO = (
    "TrainState",
    "check_resumable",
    "load_component_weights",
    "load_for_resume",
    "load_weights",
    "save_checkpoint",
)

__all__ = [*_IO, "checkpoints_dir", "find_latest", "read_manifest", "versions", "write_manifest"]


def __getattr__(name: str):
    if name in _IO:
        from omni_train.checkpoint import io

        return getattr(io, name)
    raise AttributeError(f"module 'omni_train.checkpoint' has no attribute {name!r}")
