"""Compose a job config from ``recipes/`` and command-line overrides with Hydra's compose API.

The compose API (rather than ``@hydra.main``) keeps Hydra from changing the working directory
or writing its own output folders, which matters under torchrun where every rank composes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from omni_train.config.hf import model_overrides
from omni_train.config.overrides import check_overrides
from omni_train.config.schema import JobConfig

_REGISTERED = False


def recipes_dir() -> Path:
    """The recipe tree: ``$OMNI_TRAIN_RECIPES`` or ``recipes/`` beside the package."""
    path = Path(os.environ.get("OMNI_TRAIN_RECIPES", Path(__file__).parents[2] / "recipes"))
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"no recipes/config.yaml under {path}; install omni-train editable (make setup) "
            "or point OMNI_TRAIN_RECIPES at the recipes folder"
        )
    return path.resolve()


def register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        ConfigStore.instance().store(name="omni_train_job", node=JobConfig)
        _REGISTERED = True


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml"))


def groups() -> dict[str, list[str]]:
    """Every recipe group (a folder of ``recipes/``) and its recipes."""
    return {d.name: available(d.name) for d in sorted(recipes_dir().iterdir()) if d.is_dir()}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def compose_job(overrides: list[str] | None = None) -> JobConfig:
    """Compose, resolve and type-check a job config (per-field checks run here).

    With ``model.hf_path`` set (``model=hf model.hf_path=DIR``) the model fields come from the
    checkpoint's config.json (:mod:`omni_train.config.hf`): a second composition puts them
    before the command line's overrides, so an explicit ``model.*`` override still wins.
    """
    overrides = list(overrides or [])
    check_overrides(overrides, groups())  # a key that names nothing, before Hydra drops it
    register()
    try:
        raw = _compose(overrides)
        hf_path = OmegaConf.select(raw, "model.hf_path", throw_on_missing=False)
        is_hf = OmegaConf.select(raw, "model.name", throw_on_missing=False) == "hf"
        if hf_path and not is_hf:
            raise ValueError(f"model.hf_path={hf_path} needs model=hf (recipes/model/hf.yaml)")
        if is_hf and not hf_path:
            raise ValueError("model=hf needs model.hf_path=DIR (a Hugging Face checkpoint folder)")
        if hf_path:
            raw = _compose([*model_overrides(hf_path), *overrides])
        OmegaConf.resolve(raw)
        cfg = OmegaConf.to_object(raw)
    except (HydraException, OmegaConfBaseException) as e:
        # A misspelt key or a wrong type: one line, plus where to look up the valid fields.
        cause = e
        while cause.__cause__ is not None and isinstance(cause.__cause__, ValueError):
            cause = cause.__cause__
        if isinstance(cause, ValueError) and not isinstance(cause, OmegaConfBaseException):
            raise cause from None  # our own per-field check, already one line
        lines = [str(e).strip().splitlines()[0]]
        if e.__cause__ is not None and str(e.__cause__).strip():
            lines.append(str(e.__cause__).strip().splitlines()[0])
        raise ValueError(f"{': '.join(lines)} ('omni-train config' prints every field)") from e
    assert isinstance(cfg, JobConfig)
    return cfg


def to_dict(cfg: JobConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_hash(cfg: JobConfig, *, sections: tuple[str, ...] | None = None) -> str:
    """Stable short hash of the whole config, or of some sections (e.g. the model fingerprint).
    ``model.hf_path`` is left out: where a checkpoint's config was read from is not the model."""
    data = to_dict(cfg)
    data["model"].pop("hf_path", None)
    if sections is not None:
        data = {k: data[k] for k in sections}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
