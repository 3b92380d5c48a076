"""``manifest.json``: what a stage run did, readable without torch.

Written by rank 0 at every checkpoint (``status: "running"``) and when the run ends:
``"completed"`` (reached ``trainer.train_steps``) or ``"interrupted"`` (stopped early by
``trainer.exit_after_steps``; a later run resumes). The next stage reads it to check that its
input completed.
"""

from __future__ import annotations

import json
import os
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


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {output_dir}")
    return json.loads(path.read_text())
