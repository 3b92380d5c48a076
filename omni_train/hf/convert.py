"""``omni-train checkpoint import-hf``: released checkpoints in (served ones out, ``export-hf``:
:mod:`omni_train.hf.export`).

**Import** (Hugging Face safetensors or a NeMo ``.nemo`` Parakeet -> torch_dist). The model is
built on the meta device at TP=1 in a one-process world; each of its weights is then made from
the released tensors (:mod:`omni_train.hf.weights`) and megatron's
``dist_checkpointing`` writes them. The safetensors files are memory-mapped and renamed tensors
are views of the mapping, so only converted tensors (fused q/k/v, a dtype change) are copied;
the writer copies one tensor at a time. torch_dist reshards on load, so the result starts a stage
on any TP/EP/CP layout (``checkpoint.init_from``) or, for one component, is a stage-0
``checkpoint.init_components.<component>``. Every released tensor is either used or named in
``weights.EXTRA`` (ignored for a stated reason, checked, or refused): nothing is dropped
silently.

**Export**: :mod:`omni_train.hf.export`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from omni_train.checkpoint import find_latest
from omni_train.checkpoint.manifest import (
    IMPORT_MANIFEST,
    architecture_diff,
    read_import_manifest,
    read_manifest,
    versions,
)
from omni_train.config import JobConfig, compose_job, config_hash, to_dict
from omni_train.config import hf as hf_config
from omni_train.config.model import ModelConfig
from omni_train.hf import weights
from omni_train.hf.nemo import read_nemo
from omni_train.hf.safetensors_io import SafetensorsReader
from omni_train.log import get_logger
from omni_train.model.build import build_omni_model
from omni_train.model.meta import parameters_on_meta
from omni_train.model.specs import platform_leaves
from omni_train.parallel.state import local_world
from omni_train.platform import setup

log = get_logger()

SOURCE_CONFIG = "hf_config.json"  # the config.json an import was made from (export's base)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ---- the model, on meta, in a world of one -----------------------------------------------------


def _job(model: ModelConfig | None, overrides: list[str], precision: str) -> JobConfig:
    cfg = compose_job([*overrides, "parallel=single", f"trainer.precision={precision}"])
    if model is not None:
        cfg.model = model
    return cfg


def model_from_section(section: dict, overrides: list[str] | None = None) -> ModelConfig:
    """A ``ModelConfig`` from a saved ``model`` section (manifest, import manifest), with the
    ``model.<field>=<value>`` items of ``overrides`` applied."""
    section = {k: v for k, v in section.items() if k in ModelConfig.__dataclass_fields__}
    dotlist = [o.removeprefix("model.") for o in overrides or () if o.startswith("model.")]
    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), section, OmegaConf.from_dotlist(dotlist)
    )
    return OmegaConf.to_object(merged)


class _MetaModel:
    """The model of ``cfg`` at TP=1 on the meta device, inside a one-process world (the world
    stays up while the context is open: dist_checkpointing needs it)."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    def __enter__(self):
        # (no os.environ change here: it would leak into every later process this one starts;
        # the CLI runs conversions with OMNI_TRAIN_PLATFORM=cpu)
        platform = setup()
        if platform.is_cuda:
            raise ValueError("checkpoint conversion runs on the CPU platform; unset CUDA devices")
        self._world = local_world(self.cfg.parallel, platform, self.cfg.trainer.seed)
        ps = self._world.__enter__()
        with parameters_on_meta():
            model, _ = build_omni_model(self.cfg, ps, platform, platform_leaves(platform), False)
        self.model = model
        return self

    def __exit__(self, *exc):
        self._world.__exit__(*exc)


def _set_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer ``key`` (keeping megatron's attributes on parameters)."""
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path)
    if name in module._parameters:
        old = module._parameters[name]
        new = torch.nn.Parameter(tensor, requires_grad=False)
        new.__dict__.update(old.__dict__)
        module._parameters[name] = new
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise KeyError(f"{key} is neither a parameter nor a buffer")


def _tensor_keys(
    model: torch.nn.Module, prefixes: tuple[str, ...]
) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in model.state_dict(keep_vars=True).items():
        if key.startswith(prefixes) and isinstance(value, torch.Tensor):
            yield key, value


# ---- import ------------------------------------------------------------------------------------


@dataclass
class ImportReport:
    source: str
    source_kind: str
    components: list[str]
    tensors: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Source:
    """Released-name tensors of a safetensors folder (through :class:`weights.CurrentNames`
    when it uses transformers' in-memory names)."""

    def __init__(self, folder: Path):
        reader = SafetensorsReader(folder)
        self.current = weights.is_current_naming(reader.keys())
        self.view = weights.CurrentNames(reader) if self.current else reader

    def keys(self) -> list[str]:
        return self.view.keys()

    def get(self, name: str) -> torch.Tensor:
        return self.view.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.view


def _audio_prefix(keys: list[str]) -> str:
    return "encoder." if any(k.startswith("encoder.layers.") for k in keys) else ""


def _check_component_fields(kind: str, derived: dict, target: dict) -> list[str]:
    """Differences between a component checkpoint's config and the target model's part."""
    if kind == "llm":
        skip = ("vision", "audio", "vision_projector_ffn_hidden_size")
        lm = {k: v for k, v in derived.items() if k not in skip and "projector" not in k}
        return architecture_diff(lm, target, saved_keys_only=True)
    part = "vision" if kind == "vision_encoder" else "audio"
    if target.get(part) is None:
        return [f"the target model has no {part} encoder (model.{part}=null)"]
    src = dict(derived[part])
    if part == "vision" and src.get("tubelet_frames") is None:
        src.pop("tubelet_frames")  # an image-only RADIO: the video embedder is inflated
    return architecture_diff(src, target[part], f"{part}.", saved_keys_only=True)


def import_hf(
    source: str | Path,
    out: str | Path,
    overrides: list[str] | None = None,
    *,
    dtype: str = "source",
) -> ImportReport:
    """Convert a released checkpoint folder (or ``.nemo`` file) into a torch_dist checkpoint
    in ``out`` (which must not exist or be empty). ``overrides``: ``model=<recipe>`` names the
    model a component checkpoint is imported for (required for RADIO / Parakeet); without it
    the model is the checkpoint's own (``model=hf``). ``dtype``: ``source`` keeps the released
    dtype; ``bf16``/``fp32``/``fp16`` converts floating-point tensors."""
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    overrides = list(overrides or [])
    if dtype != "source" and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype}: use source, {', '.join(_DTYPES)}")
    _check_out(out)
    nemo = source.suffix == ".nemo"
    if nemo:
        audio_fields, src = read_nemo(source)  # NeMo's encoder config and state dict
        kind, derived, raw_config = "audio_encoder", {"audio": audio_fields}, None
    else:
        raw_config = hf_config.read_config(source)
        kind, derived = hf_config.model_fields(raw_config)
        src = _Source(source)
    explicit_model = any(o.lstrip("+").split("=", 1)[0] == "model" for o in overrides)
    if kind in ("omni", "llm") and not explicit_model:
        cfg = _job(None, ["model=hf", f"model.hf_path={source}", *overrides], "fp32")
        components = cfg.model.components if kind == "omni" else ["llm"]
    else:
        if not explicit_model:
            raise ValueError(
                f"{source} holds a {kind} alone: name the model it is imported for, e.g. "
                "model=nano_omni_30b_a3b (its fields are checked against the checkpoint)"
            )
        cfg = _job(None, overrides, "fp32")
        components = cfg.model.components if kind == "omni" else [kind]
    target = to_dict(cfg)["model"]
    if kind == "omni":
        diff = architecture_diff(derived, target, saved_keys_only=True)
    else:
        diff = _check_component_fields(kind, derived, target)
    if diff:
        raise ValueError(
            f"{source} does not match the target model: {'; '.join(diff[:6])}; import with "
            "the checkpoint's own model (leave model= out, or model=hf model.hf_path=...)"
        )
    report = ImportReport(str(source), kind, components)
    keys = src.keys() if not isinstance(src, dict) else list(src)
    if kind == "omni":
        prefixes = weights.Prefixes()
    else:
        prefixes = weights.Prefixes.alone(kind, _audio_prefix(keys))
    if isinstance(src, dict):  # .nemo: NeMo's own names, one to one
        prefixes = None
    with staged(out, "importing") as tmp:
        with _MetaModel(cfg) as meta:
            used = _fill(meta.model, cfg, components, src, prefixes, dtype, report)
            _check_leftovers(keys, used, src, report)
            _save(meta.model, components, tmp)
        _write_import_manifest(tmp, cfg, report, dtype, None if nemo else raw_config)
    report.seconds = time.perf_counter() - start
    return report


@contextlib.contextmanager
def staged(out: Path, verb: str) -> Iterator[Path]:
    """A folder beside ``out`` to write into, renamed to ``out`` when the block ends without
    an error: a failed conversion leaves nothing half-written under the name a stage or
    transformers would load. ``out`` must be absent or empty (:func:`_check_out`)."""
    tmp = out.with_name(f".{out.name}.{verb}-{os.getpid()}")
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)


def _fill(model, cfg, components, src, prefixes, dtype, report) -> set[str]:
    """Set every weight of ``components`` from ``src``; returns the source names used."""
    section = to_dict(cfg)["model"]
    wanted = tuple(f"{c}." for c in components)
    used: set[str] = set()
    missing = []
    for key, current in _tensor_keys(model, wanted):
        if prefixes is None:  # a .nemo: audio_encoder.encoder.<NeMo name> <- encoder.<NeMo name>
            if not key.startswith("audio_encoder."):
                continue  # the projector of a .nemo import keeps its initialisation
            name = key.removeprefix("audio_encoder.")
            if name not in src:
                missing.append(name)
                continue
            tensor, names = src[name], (name,)
        else:
            rule = weights.rule_for(key, section, prefixes)
            if rule is None:
                continue
            absent = [n for n in rule.released if n not in src]
            if absent and key == "vision_encoder.video_embedder.weight":
                tensor = _inflated_video_embedder(src, prefixes, cfg.model.vision.tubelet_frames)
                report.notes.append(
                    "the checkpoint has no video embedder (image-only RADIO): it starts as the "
                    "image embedder inflated over the tubelet frames"
                )
                names = ()
            elif absent:
                missing += absent
                continue
            else:
                tensor = rule.to_ours([src.get(n) for n in rule.released])
                names = rule.released
        if tuple(tensor.shape) != tuple(current.shape):
            raise ValueError(
                f"{', '.join(names) or key}: shape {tuple(tensor.shape)} does not fit "
                f"omni-train's {key} {tuple(current.shape)}"
            )
        if dtype != "source" and tensor.is_floating_point():
            tensor = tensor.to(_DTYPES[dtype])
        _set_tensor(model, key, tensor)
        used.update(names)
        report.tensors += 1
        report.bytes += tensor.numel() * tensor.element_size()
    if missing:
        raise ValueError(
            f"{report.source}: {len(missing)} tensors the model needs are missing, e.g. "
            f"{missing[:5]}"
        )
    return used


def _inflated_video_embedder(src, prefixes, frames: int) -> torch.Tensor:
    image = src.get(f"{prefixes.vision}radio_model.model.patch_generator.embedder.weight")
    return image.repeat(1, frames) / frames


def _check_leftovers(keys, used, src, report) -> None:
    unknown, refused = [], []
    for name in keys:
        if name in used:
            continue
        action = weights.classify_extra(name)
        if action == "ignore":
            continue
        if action == "ones":
            value = src.get(name) if not isinstance(src, dict) else src[name]
            if not torch.all(value == 1):
                raise ValueError(
                    f"{name} is not all ones: the checkpoint's ViT has LayerScale factors, "
                    "which omni-train's RADIO (megatron-core) does not have"
                )
            continue
        (refused if action == "refuse" else unknown).append(name)
    if refused:
        raise ValueError(
            f"{report.source} holds multi-token-prediction weights ({refused[:3]}...); "
            "omni-train's LM has no MTP layers and will not drop them silently"
        )
    if unknown:
        raise ValueError(
            f"{report.source}: {len(unknown)} tensors have no place in omni-train's model, e.g. "
            f"{unknown[:5]}; nothing is dropped silently"
        )


def _save(model, components, path: Path) -> None:
    from megatron.core import dist_checkpointing

    wanted = tuple(f"{c}." for c in components)
    sharded = {k: v for k, v in model.sharded_state_dict().items() if k.startswith(wanted)}
    path.mkdir(parents=True)
    dist_checkpointing.save({"model": sharded}, str(path))


def _write_import_manifest(path: Path, cfg, report: ImportReport, dtype: str, raw: dict | None):
    manifest = {
        "kind": "hf_import",
        "source": report.source,
        "source_kind": report.source_kind,
        "components": report.components,
        "model": to_dict(cfg)["model"],
        "model_fingerprint": config_hash(cfg, sections=("model",)),
        "dtype": dtype,
        "tensors": report.tensors,
        "bytes": report.bytes,
        "notes": report.notes,
        "versions": versions(),
    }
    (path / IMPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if raw is not None:
        (path / SOURCE_CONFIG).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


# ---- export ------------------------------------------------------------------------------------


def _init_source(manifest: dict, depth: int = 0) -> dict | None:
    """The config.json an ``init_from`` chain started from (an import), if any."""
    init = manifest.get("init_from")
    if not init or depth > 32:
        return None
    path = Path(init)
    imported = read_import_manifest(path)
    if imported is not None:
        base = path / SOURCE_CONFIG
        return json.loads(base.read_text()) if base.is_file() else None

    run = path if (path / "checkpoints").is_dir() else path.parent.parent
    try:
        return _init_source(read_manifest(run), depth + 1)
    except FileNotFoundError:
        return None


def resolve_checkpoint(path: str | Path) -> tuple[Path, dict, dict | None]:
    """(the torch_dist folder, its ``model`` section, the config.json it descends from or
    None) of an import folder, a stage's output_dir or one of its ``checkpoints/step_*``."""
    path = Path(path)
    imported = read_import_manifest(path)
    if imported is not None:
        base = path / SOURCE_CONFIG
        return path, imported["model"], json.loads(base.read_text()) if base.is_file() else None
    if (path / "checkpoints").is_dir():
        run, ckpt = path, find_latest(path)
        if ckpt is None:
            raise ValueError(f"{path} holds no complete checkpoint")
    elif path.parent.name == "checkpoints" and (path / "metadata.json").is_file():
        run, ckpt = path.parent.parent, path
    else:
        raise ValueError(
            f"{path} is not an import folder, a stage output_dir or a checkpoints/step_* folder"
        )
    manifest = read_manifest(run)
    section = manifest["model"]
    base = None
    if section.get("hf_path"):
        try:
            base = hf_config.read_config(section["hf_path"])
        except FileNotFoundError:
            log.warning(
                "model.hf_path=%s is gone; config.json is written from scratch", section["hf_path"]
            )
    return ckpt, section, base or _init_source(manifest)
