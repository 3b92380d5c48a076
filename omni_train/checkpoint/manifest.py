"""``manifest.json``: what a stage run did, readable without torch.

Written by rank 0 at every checkpoint (``status: "running"``) and when the run ends:
``"completed"`` (reached ``trainer.train_steps``), ``"interrupted"`` (stopped early by
``trainer.exit_after_steps`` or a signal; a later run resumes) or ``"failed"`` (with ``error``;
written by rank 0, or by the launcher when a rank died without saying why). The next stage
reads it to check that its input completed.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def write_manifest(output_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(output_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)  # a run can stop before its first checkpoint
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def check_model_fingerprint(checkpoint: str | os.PathLike, have: str) -> None:
    """Raise ValueError if the run that wrote ``checkpoint`` (a stage folder or one of its
    checkpoints) trained another model than the config whose model fingerprint is ``have``
    (``config_hash(cfg, sections=("model",))``). Without a manifest (an imported checkpoint)
    there is nothing to check."""
    manifest_dir = Path(checkpoint)
    if not (manifest_dir / MANIFEST).is_file():
        manifest_dir = manifest_dir.parent.parent  # <stage>/checkpoints/step_N
    if not (manifest_dir / MANIFEST).is_file():
        return
    want = read_manifest(manifest_dir).get("model_fingerprint")
    if want is not None and want != have:
        raise ValueError(
            f"{checkpoint} was trained with another model config (fingerprint {want}, "
            f"these overrides give {have}); pass the stage's model overrides"
        )


def mark_failed(output_dir: str | os.PathLike, error: str, **fields: Any) -> Path:
    """The manifest says ``failed`` with ``error`` (everything else of an existing one kept;
    ``fields`` added, e.g. the stage's name when there was none). A ``completed`` stage stays
    completed (its final checkpoint is intact and the next stage hands off from it): a rerun
    that failed before changing anything is noted as ``rerun_error``."""
    try:
        manifest = read_manifest(output_dir)
    except (FileNotFoundError, ValueError):
        manifest = dict(fields)
    if manifest.get("status") == "completed":
        return write_manifest(output_dir, {**manifest, "rerun_error": error})
    return write_manifest(output_dir, {**manifest, "status": "failed", "error": error})


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {output_dir}")
    return json.loads(path.read_text())


def versions() -> dict[str, str]:
    """The software a checkpoint was written with."""
    import megatron.core
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
    }


# ---- imported checkpoints (omni-train checkpoint import-hf) -----------------------------------

IMPORT_MANIFEST = "omni_train_import.json"
# `model` fields that are training choices, not weights: an imported checkpoint may be loaded by
# a stage that sets them differently (omni_train.stage.handoff compares everything else)
TRAINING_FIELDS = frozenset(
    {
        "name",
        "hf_path",
        "init_method_std",
        "projector_init_method_std",
        "moe_aux_loss_coeff",
        "vision.min_patches",
        "vision.max_patches",
        "vision.video_patch_budgets",
        "vision.init_method_std",
        "audio.dropout",
        "audio.dither",
        "audio.clip_seconds",
        "audio.min_seconds",
    }
)


def read_import_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The import manifest of an ``import-hf`` folder, or None for any other folder."""
    file = Path(path) / IMPORT_MANIFEST
    return json.loads(file.read_text()) if file.is_file() else None


def architecture_diff(
    saved: dict, current: dict, prefix: str = "", *, saved_keys_only: bool = False
) -> list[str]:
    """``model`` fields (dotted) that differ between two model sections, training choices
    (:data:`TRAINING_FIELDS`) left out; ``saved_keys_only``: only the fields ``saved`` has (a
    config derived from a checkpoint describes fewer fields than omni-train's)."""
    out = []
    names = set(saved) if saved_keys_only else set(saved) | set(current)
    for key in sorted(names):
        name = f"{prefix}{key}"
        if name in TRAINING_FIELDS:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += architecture_diff(a, b, f"{name}.", saved_keys_only=saved_keys_only)
        elif a != b:
            out.append(f"model.{name}: {a!r} (checkpoint) vs {b!r} (this config)")
    return out
