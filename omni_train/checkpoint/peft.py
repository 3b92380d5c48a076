"""What a LoRA stage's checkpoint holds, and the base it stands on (pure json and pathlib: the
launcher's handoff check reads it without megatron-core).

A LoRA stage that starts from a checkpoint (``checkpoint.init_from``: the previous stage, or an
imported release) saves only what it trains: the adapters, and the components it trains whole
(the projectors under ``recipes/peft/lora.yaml``). Everything else is its *base*, which every
such checkpoint names in ``omni_train_peft.json``::

    {"format": 1, "peft": {"method": "lora", "rank": 16, "alpha": 32.0, ...},
     "whole": ["audio_projector", "vision_projector"],
     "base": "/abs/runs/stage3/checkpoints/step_0001000", "base_fingerprint": "9f2c..."}

The fingerprint (:func:`omni_train.checkpoint.integrity.fingerprint`) refuses a base that was
replaced or rewritten since the adapters were trained. A LoRA stage without ``init_from`` (a
random or component-initialised base exists nowhere else) saves the whole model with its
adapters; its record says ``"base": null``.

Loading one (:func:`omni_train.checkpoint.io.load_weights`): the base first (itself perhaps an
adapter checkpoint: a chain), then the whole components, then the adapters, merged into the
base weights. A resume loads the base the same way and the adapters into the live ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omni_train.checkpoint.integrity import NO_RECORD, fingerprint, verify

RECORD = "omni_train_peft.json"


def make_record(peft: dict, whole: list[str], base: Path | None) -> dict:
    """The record a LoRA stage writes into each checkpoint (``peft``: the config section)."""
    return {
        "format": 1,
        "peft": peft,
        "whole": sorted(whole),
        "base": str(Path(base).resolve()) if base is not None else None,
        "base_fingerprint": fingerprint(Path(base)) if base is not None else None,
    }


def write_record(ckpt: Path, record: dict) -> None:
    tmp = ckpt / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, ckpt / RECORD)


def read_record(ckpt: str | os.PathLike) -> dict | None:
    """The checkpoint's LoRA record, or None (a checkpoint without adapters)."""
    path = Path(ckpt) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def holds(record: dict | None, key: str) -> bool:
    """Whether a checkpoint with ``record`` holds the model entry ``key``: everything unless it
    is adapter-only; then the adapters and the components trained whole."""
    if record is None or record["base"] is None:
        return True
    return ".lora." in key or key.split(".", 1)[0] in record["whole"]


def check_base_chain(ckpt: Path) -> list[Path]:
    """The bases ``ckpt`` stands on, nearest first, each there, intact and unchanged since the
    adapters on it were trained; raises ValueError saying which is not and what to do."""
    chain: list[Path] = []
    record = read_record(ckpt)
    while record is not None and record["base"] is not None:
        base = Path(record["base"])
        what = f"{ckpt} holds LoRA adapters and the parts its stage trained whole; its base {base}"
        if not (base / "metadata.json").is_file():
            raise ValueError(
                f"{what} is gone. The adapters mean nothing without it: restore it there (or "
                "merge the adapters while it exists: omni-train checkpoint export-hf --merge)"
            )
        why = verify(base)
        if why is not None and why != NO_RECORD:
            raise ValueError(f"{what} is damaged: {why}; restore it from a copy")
        if base in chain or base == ckpt:
            raise ValueError(f"{what} is part of a circle of bases")
        have = fingerprint(base)
        if have != record["base_fingerprint"]:
            raise ValueError(
                f"{what} changed since the adapters were trained on it (fingerprint "
                f"{record['base_fingerprint']}, now {have}): the adapters fit only the weights "
                "they were trained on; restore that base"
            )
        chain.append(base)
        ckpt, record = base, read_record(base)
    return chain
