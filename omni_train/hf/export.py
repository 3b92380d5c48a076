"""``omni-train checkpoint export-hf``: a stage checkpoint (any training layout) -> safetensors
under the released names, loadable by transformers.

**Export** (torch_dist, any training layout -> safetensors under the released names). The model
is built on meta (as for import); its weights are loaded from the checkpoint one group (a layer, the
embedding, an encoder) at a time, converted and streamed into the safetensors shards, whose
headers were planned beforehand from the meta shapes. ``config.json`` is written from the
``model`` config (on top of the config.json it was imported from, when there is one, which keeps
token ids and generation settings) and checked by deriving the model back from it.

A LoRA checkpoint exports merged (``--merge``) or as the weights without its adapters plus a
PEFT adapter folder (:mod:`omni_train.hf.adapters`).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_train.checkpoint.manifest import architecture_diff
from omni_train.config import hf as hf_config
from omni_train.config.model import ModelConfig
from omni_train.hf import adapters, weights
from omni_train.hf.convert import (
    _DTYPES,
    _check_out,
    _job,
    _MetaModel,
    _tensor_keys,
    model_from_section,
    resolve_checkpoint,
    staged,
)
from omni_train.hf.safetensors_io import ShardedWriter, TensorPlan


@dataclass
class ExportReport:
    checkpoint: str
    out: str
    files: list[str]
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0


# megatron stores the ViT's blocks stacked along a layer axis under one key per weight, and
# torch_dist reads a key whole (a one-layer slice fails its shard-metadata check), so the vision
# encoder is loaded in one piece (0.65B parameters in the release); LM and conformer layers have
# keys of their own.
_LAYER_GROUP = re.compile(r"(llm\.decoder\.layers\.\d+|audio_encoder\.encoder\.layers\.\d+)\.")


def _group(key: str) -> str:
    """What is loaded at once: one layer, or the rest of one component."""
    m = _LAYER_GROUP.match(key)
    return m.group(1) if m else key.split(".", 1)[0]


def _checkpoint_dtypes(ckpt: Path, sharded: dict) -> dict[str, torch.dtype]:
    """Each weight's dtype as stored (params may be bf16 and buffers fp32)."""
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(ckpt))
    out = {}
    for key, entry in sharded.items():
        name = entry.key
        if name in stored:
            out[key] = stored[name].dtype
            continue
        match = next((v for k, v in stored.items() if k.startswith(f"{name}.")), None)
        if match is None:
            raise ValueError(
                f"{ckpt} has no tensor {name}: it was written for another model config "
                "(its manifest's model section is what export builds)"
            )
        out[key] = match.dtype
    return out


def _copy_processor(source: Path, out: Path) -> list[str]:
    """Tokenizer, chat template and processor files: everything but weights and config.json."""
    skip = re.compile(r".*\.(safetensors|bin|pt|pth|nemo|ckpt)$|config\.json$|.*\.index\.json$")
    copied = []
    for item in sorted(source.iterdir()):
        if item.is_file() and not skip.fullmatch(item.name):
            shutil.copy2(item, out / item.name)
            copied.append(item.name)
    return copied


def export_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    copy_processor_from: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    merge: bool = False,
) -> ExportReport:
    """Write ``checkpoint`` (any training layout) as a Hugging Face checkpoint in ``out``:
    config.json, safetensors shards under the released names and their index, plus the
    processor files of ``copy_processor_from``. ``dtype`` (bf16/fp32/fp16) converts floating
    tensors; by default each keeps its stored dtype.

    A LoRA checkpoint (:mod:`omni_train.hf.adapters`): ``merge`` writes its adapters merged
    into the weights (what vLLM serves); without it, the weights without its own adapters and
    a PEFT adapter folder in ``out/adapter``."""
    from megatron.core import dist_checkpointing

    start = time.perf_counter()
    out = Path(out)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype}: use {', '.join(_DTYPES)}")
    ckpt, section, base = resolve_checkpoint(checkpoint)
    levels = adapters.chain(ckpt)
    if merge and levels[0].record is None:
        raise ValueError(f"--merge: {ckpt} holds no LoRA adapters, so there is nothing to merge")
    # the levels whose adapters go into the weights; the newest one's, without --merge, go
    # into the PEFT folder
    merged = [i for i, level in enumerate(levels) if level.record and (merge or i > 0)]
    config = hf_config.omni_config(section, base)  # refuses what the reference cannot express
    _check_out(out)
    model_cfg = model_from_section(section)
    cfg = _job(model_cfg, [], "fp32")
    prefixes = weights.Prefixes() if model_cfg.vision is not None else weights.Prefixes.alone("llm")
    report = ExportReport(str(ckpt), str(out), [])
    peft_out = top = None
    with staged(out, "exporting") as tmp:
        tmp.mkdir(parents=True)
        with _MetaModel(cfg) as meta:
            model = meta.model
            keys = [k for k, _ in _tensor_keys(model, tuple(f"{c}." for c in model_cfg.components))]
            rules = {k: r for k in keys if (r := weights.rule_for(k, section, prefixes))}
            sharded = {k: v for k, v in model.sharded_state_dict().items() if k in rules}
            source = {k: adapters.source_level(levels, k) for k in sharded}
            stored = {}
            for i, level in enumerate(levels):
                mine = {k: v for k, v in sharded.items() if source[k] == i}
                stored.update(_checkpoint_dtypes(level.path, mine) if mine else {})
            readers = {i: adapters.AdapterReader.of(model, levels[i]) for i in merged}
            if not merge and levels[0].record is not None:
                peft_out, top = adapters.PeftTensors(), adapters.AdapterReader.of(model, levels[0])
            params = dict(_tensor_keys(model, ("",)))
            group_keys: dict[str, list[str]] = {}
            for key in rules:
                group_keys.setdefault(_group(key), []).append(key)
            plans = []  # in the order the groups are loaded and written
            for key in (k for members in group_keys.values() for k in members):
                probe = torch.empty(params[key].shape, dtype=stored[key], device="meta")
                for name, t in zip(rules[key].released, rules[key].to_released(probe), strict=True):
                    plans.append(TensorPlan(name, _out_dtype(t.dtype, dtype), tuple(t.shape)))
            extras = _export_extras(model_cfg, prefixes)
            plans += [TensorPlan(n, t.dtype, tuple(t.shape)) for n, t in extras.items()]
            writer = ShardedWriter(tmp, plans, max_shard_bytes)
            for group, members in group_keys.items():
                loaded = {}
                for i in sorted({source[k] for k in members}):
                    subset = {}
                    for key in (k for k in members if source[k] == i):
                        entry = sharded[key]
                        entry.data = torch.empty(params[key].shape, dtype=stored[key])
                        subset[key] = entry
                    path = levels[i].path
                    try:
                        part = dist_checkpointing.load({"model": subset}, str(path))["model"]
                        loaded.update(part)
                    except Exception as e:
                        raise ValueError(f"{path}: loading {group} failed: {e}") from e
                _merge_adapters(loaded, members, readers, source)
                if peft_out is not None:
                    names = [m for k in members if (m := adapters.module_of(k)) in top.modules]
                    for name, (a, b) in top.load(names, _checkpoint_dtypes).items():
                        adapters.to_peft(peft_out, name, a, b, section, prefixes)
                for key in members:
                    rule = rules[key]
                    for name, t in zip(rule.released, rule.to_released(loaded[key]), strict=True):
                        writer.write(name, t.to(_out_dtype(t.dtype, dtype)))
                        report.tensors += 1
                        report.bytes += t.numel() * t.element_size()
                    sharded[key].data = params[key]  # back to meta: the group's memory is freed
                del loaded, subset
            for name, t in extras.items():
                writer.write(name, t)
                report.tensors += 1
            report.files = writer.close()
        floats = {p.dtype for p in plans if p.dtype.is_floating_point}
        if len(floats) == 1:
            config["dtype"] = str(floats.pop()).removeprefix("torch.")
        _check_config_roundtrip(config, section)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if copy_processor_from is not None:
            report.files += _copy_processor(Path(copy_processor_from), tmp)
        if peft_out is not None:
            adapters.write_peft_folder(tmp / adapters.ADAPTER_DIR, peft_out, top.level.peft, out)
            report.files += [f"{adapters.ADAPTER_DIR}/{adapters.ADAPTER_CONFIG}",
                             f"{adapters.ADAPTER_DIR}/{adapters.ADAPTER_WEIGHTS}"]  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def _merge_adapters(loaded: dict, members: list[str], readers: dict, source: dict) -> None:
    """Add ``alpha / r * B A`` of every level in ``readers`` newer than (or the same as) a
    weight's source to it, in fp32, back in its stored dtype."""
    for i, reader in readers.items():
        names = [m for k in members if i <= source[k] and (m := adapters.module_of(k)) in
                 reader.modules and k.endswith(".weight")]  # fmt: skip
        for name, (a, b) in reader.load(names, _checkpoint_dtypes).items():
            w = loaded[f"{name}.weight"]
            loaded[f"{name}.weight"] = (w.float() + reader.scale * (b @ a)).to(w.dtype)


def _out_dtype(stored: torch.dtype, wanted: str | None) -> torch.dtype:
    return _DTYPES[wanted] if wanted is not None and stored.is_floating_point else stored


def _export_extras(model: ModelConfig, prefixes: weights.Prefixes) -> dict[str, torch.Tensor]:
    """Released tensors with no omni-train weight: RADIO's summary token indices (a persistent
    buffer of the reference; transformers' default [0, 1])."""
    if model.vision is None:
        return {}
    return {f"{prefixes.vision}radio_model.summary_idxs": torch.tensor([0, 1], dtype=torch.int64)}


def _check_config_roundtrip(config: dict, section: dict) -> None:
    """The written config.json must describe exactly the exported model."""
    _, derived = hf_config.model_fields(config)
    diff = architecture_diff(derived, section, saved_keys_only=True)
    if diff:
        raise RuntimeError(f"the exported config.json does not describe the model: {diff[:4]}")
