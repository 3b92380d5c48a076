"""Where a stage's weights come from when it does not resume: the previous stage, or (stage 0)
pretrained component checkpoints. Checked before any process group or model exists.

A handoff (``checkpoint.init_from``) loads weights only — new optimizer, scheduler, step 0 —
and only from the *completed final* checkpoint of ``stage.previous``, written for the same model
(fingerprint = the hash of the ``model`` config section). torch_dist reshards on load, so the
parallel layout may change between stages (TP 2 -> 1; CP changes shard no weights).

A released checkpoint imported with ``omni-train checkpoint import-hf`` may start any stage: it
has no stage to come from, so only its architecture is checked (every ``model`` field except the
training choices in ``manifest.TRAINING_FIELDS``). Imported components feed
``checkpoint.init_components`` after the same check on their part of the model.
"""

from __future__ import annotations

from pathlib import Path

from omni_train.checkpoint import find_latest, read_manifest
from omni_train.checkpoint.integrity import NO_RECORD, verify
from omni_train.checkpoint.manifest import architecture_diff, read_import_manifest
from omni_train.checkpoint.peft import check_base_chain
from omni_train.config import JobConfig, config_hash, to_dict
from omni_train.log import get_logger

log = get_logger()


def _run_dir_and_checkpoint(path: Path) -> tuple[Path, Path]:
    """``path`` is a stage's output_dir or one of its ``checkpoints/step_*`` folders."""
    if (path / "checkpoints").is_dir():
        latest = find_latest(path)
        if latest is None:
            raise ValueError(f"checkpoint.init_from={path} holds no complete, intact checkpoint")
        return path, latest
    if path.parent.name == "checkpoints":
        why = verify(path)
        if why is not None and why != NO_RECORD:
            raise ValueError(f"checkpoint.init_from={path} is damaged: {why}")
        return path.parent.parent, path
    raise ValueError(
        f"checkpoint.init_from={path} is neither a stage output_dir (with checkpoints/) nor a "
        "checkpoints/step_* folder"
    )


def _model_diff(saved: dict, current: dict, prefix: str = "model") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _model_diff(a, b, f"{prefix}.{key}")
        elif a != b:
            out.append(f"{prefix}.{key}: {a!r} -> {b!r}")
    return out


def check_handoff(cfg: JobConfig) -> Path:
    """The checkpoint ``checkpoint.init_from`` names, after the handoff checks (raises
    ``ValueError`` saying what is wrong and what to do)."""
    imported = read_import_manifest(cfg.checkpoint.init_from)
    if imported is not None:
        return _check_imported(cfg, Path(cfg.checkpoint.init_from), imported)
    run_dir, ckpt = _run_dir_and_checkpoint(Path(cfg.checkpoint.init_from))
    check_base_chain(ckpt)  # a LoRA stage's checkpoint: the bases its adapters stand on
    if not cfg.checkpoint.check_handoff:
        log.warning("checkpoint.check_handoff=false: loading %s without handoff checks", ckpt)
        return ckpt
    try:
        manifest = read_manifest(run_dir)
    except FileNotFoundError:
        raise ValueError(
            f"checkpoint.init_from={run_dir} has no manifest.json, so it cannot be checked as "
            "a stage handoff; set checkpoint.check_handoff=false to load it anyway"
        ) from None
    source = manifest.get("stage")
    if cfg.stage.previous is not None and source != cfg.stage.previous:
        raise ValueError(
            f"stage {cfg.stage.name} starts from stage {cfg.stage.previous}, but "
            f"checkpoint.init_from={run_dir} holds stage {source}; point init_from at the "
            f"{cfg.stage.previous} run (or set checkpoint.check_handoff=false)"
        )
    if manifest.get("status") != "completed":
        raise ValueError(
            f"stage {source} in {run_dir} is {manifest.get('status')} (step "
            f"{manifest.get('step')}/{manifest.get('train_steps')}); finish it first (re-run it: "
            f"it resumes) before starting {cfg.stage.name}"
        )
    if ckpt.name != f"step_{manifest['step']:07d}":
        raise ValueError(
            f"checkpoint.init_from={ckpt} is not the final checkpoint of stage {source} "
            f"(step {manifest['step']}); use {run_dir} (or set checkpoint.check_handoff=false)"
        )
    fingerprint = config_hash(cfg, sections=("model",))
    if manifest.get("model_fingerprint") != fingerprint:
        diff = _model_diff(manifest.get("model", {}), to_dict(cfg)["model"])
        raise ValueError(
            f"checkpoint.init_from={run_dir} was written for another model (fingerprint "
            f"{manifest.get('model_fingerprint')}, this stage's is {fingerprint}): "
            f"{'; '.join(diff[:6]) or 'model sections differ'}; use the same model config"
        )
    log.info("handoff: %s (stage %s, completed, same model) -> %s", ckpt, source, cfg.stage.name)
    return ckpt


def _check_imported(cfg: JobConfig, path: Path, imported: dict) -> Path:
    check_base_chain(path)  # an imported PEFT adapter: the checkpoint it stands on
    if not cfg.checkpoint.check_handoff:
        log.warning("checkpoint.check_handoff=false: loading %s without checks", path)
        return path
    have, want = sorted(imported["components"]), sorted(cfg.model.components)
    if have != want:
        raise ValueError(
            f"checkpoint.init_from={path} was imported with components {have}, this model has "
            f"{want}; a component checkpoint goes into checkpoint.init_components.<component>"
        )
    diff = architecture_diff(imported["model"], to_dict(cfg)["model"])
    if diff:
        raise ValueError(
            f"checkpoint.init_from={path} (imported from {imported['source']}) is another model: "
            f"{'; '.join(diff[:6])}; train it with model=hf model.hf_path={imported['source']}"
        )
    log.info("handoff: %s (imported from %s) -> %s", path, imported["source"], cfg.stage.name)
    return path


_PARTS = {"vision_encoder": "vision", "audio_encoder": "audio"}


def _component_section(model: dict, component: str) -> tuple[dict, str]:
    """(the ``model`` fields that shape one component's weights, their dotted prefix)."""
    if component in _PARTS:
        return model.get(_PARTS[component]) or {}, f"{_PARTS[component]}."
    if component == "llm":
        skip = {"vision", "audio", "media_tokens"}
        return {k: v for k, v in model.items() if k not in skip and "projector" not in k}, ""
    return {}, ""  # a projector: import-hf never writes one alone


def check_components(cfg: JobConfig) -> dict[str, Path]:
    """``checkpoint.init_components``: component -> its checkpoint folder (each must exist; an
    imported one must hold that component, shaped as this model's)."""
    out = {}
    model = to_dict(cfg)["model"]
    for name, path in cfg.checkpoint.init_components.items():
        p = Path(path)
        if (p / "checkpoints").is_dir():
            _, p = _run_dir_and_checkpoint(p)
        if not (p / "metadata.json").is_file():
            raise ValueError(
                f"checkpoint.init_components.{name}={path} is not a torch_dist checkpoint "
                "(no metadata.json)"
            )
        imported = read_import_manifest(p)
        if imported is not None and cfg.checkpoint.check_handoff:
            if name not in imported["components"]:
                raise ValueError(
                    f"checkpoint.init_components.{name}={path} holds {imported['components']} "
                    f"(imported from {imported['source']}), not {name}"
                )
            (saved, prefix), (current, _) = (
                _component_section(imported["model"], name),
                _component_section(model, name),
            )
            diff = architecture_diff(saved, current, prefix)
            if diff:
                raise ValueError(
                    f"checkpoint.init_components.{name}={path} does not fit this model's {name}: "
                    f"{'; '.join(diff[:6])}"
                )
        out[name] = p
    return out
