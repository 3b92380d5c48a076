"""LoRA checkpoints in Hugging Face terms: merged into the exported weights, or a PEFT adapter
folder that ``peft`` loads onto transformers' reference model (``export-hf``), and back
(``import-hf --base``).

A LoRA checkpoint stands on a chain of bases (:mod:`omni_train.checkpoint.peft`): each weight
comes from the newest checkpoint of the chain that holds it, plus ``alpha / r * B A`` of every
adapter trained on top of it. ``export-hf --merge`` writes that sum; without it the export is
the stage's model *without its own adapters* (deeper adapters merged, the components its stage
trained whole included), and the adapters go to ``<out>/adapter/`` as PEFT writes them:

- ``adapter_config.json``: peft's ``LoraConfig`` (rank, alpha, ``target_modules`` by full
  module name, ``target_parameters`` for the routed experts), ``base_model_name_or_path`` the
  export folder;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
  ``.lora_B.weight`` ``[out, r]`` under the module names of transformers' reference model
  (``transformers/models/nemotron_h_omni``: ``language_model.model.layers.N.mixer.q_proj``, ...,
  after its checkpoint conversion), not the checkpoint names of ``weights.py``. A fused linear
  of ours becomes several of theirs with the same ``A`` and row blocks of ``B`` (the LM's and
  RADIO's q/k/v), which is exact. The routed experts are one 3-D parameter per layer there
  (``experts.up_proj`` ``[E, out, in]``): peft's ``ParamWrapper`` holds all experts' adapters in
  one pair, ``lora_A`` ``[E r, in]`` (expert-major rows) and ``lora_B`` ``[out, r E]``
  (expert-minor columns); wrappers of one module nest in parameter order, so ``up_proj``'s keys
  carry ``.base_layer`` when ``down_proj`` is adapted too.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from omni_train.checkpoint.peft import (
    check_base_chain,
    holds,
    make_record,
    read_record,
    write_record,
)
from omni_train.config.peft import LORA_GROUPS, PeftConfig
from omni_train.hf import convert, weights
from omni_train.model.lora import adapter_requests, saved_adapters

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Level:
    """One checkpoint of a LoRA chain: its folder and its LoRA record (None: no adapters)."""

    path: Path
    record: dict | None

    @property
    def peft(self) -> PeftConfig | None:
        return PeftConfig(**self.record["peft"]) if self.record else None


def chain(ckpt: Path) -> list[Level]:
    """``ckpt`` and the bases it stands on, newest first (checked: there, intact, unchanged)."""
    return [Level(p, read_record(p)) for p in [ckpt, *check_base_chain(ckpt)]]


def source_level(levels: list[Level], key: str) -> int:
    """Index of the newest level that holds the weight ``key``."""
    for i, level in enumerate(levels):
        if ".lora." not in key and holds(level.record, key):
            return i
    raise ValueError(f"no checkpoint of {levels[0].path}'s chain holds {key}")


@dataclass
class AdapterReader:
    """The adapters one level saved, read one module at a time through the meta model's sharded
    state (whole tensors: the meta model is a world of one). ``modules``: {name: (A shape, B
    shape)}."""

    level: Level
    requests: dict = field(default_factory=dict)
    modules: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: torch.nn.Module, level: Level) -> AdapterReader:
        reader = cls(level)
        with saved_adapters(model, level.peft) as targets:
            reader.requests = adapter_requests(model, targets)
            reader.modules = {n: (tuple(m.lora.A.shape), tuple(m.lora.B.shape))
                              for n, m in targets.items()}  # fmt: skip
        return reader

    @property
    def scale(self) -> float:
        return self.level.peft.scale

    def load(self, names: list[str], dtypes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (A, B)} in fp32 for ``names`` (``dtypes(path, request)``: stored dtypes)."""
        from megatron.core import dist_checkpointing  # lazy: as export.export_hf

        subset = {f"{n}.lora.{x}": self.requests[f"{n}.lora.{x}"] for n in names for x in "AB"}
        stored = dtypes(self.level.path, subset) if subset else {}
        for key, entry in subset.items():
            module, _, part = key.rpartition(".lora.")
            entry.data = torch.empty(self.modules[module]["AB".index(part)], dtype=stored[key])
        if not subset:
            return {}
        loaded = dist_checkpointing.load({"model": subset}, str(self.level.path))["model"]
        return {n: (loaded[f"{n}.lora.A"].float(), loaded[f"{n}.lora.B"].float()) for n in names}


def module_of(key: str) -> str:
    return key.removesuffix(".weight")


# ---- PEFT names: transformers' reference model after its checkpoint conversion ---------------

# released checkpoint name -> the reference model's module name (transformers 5.23
# conversion_mapping: "nemotron_h", "radio", "NemotronH_Omni_Reasoning_V3")
_RUNTIME = (
    (r"^(language_model\.)?backbone\.", r"\1model."),
    (r"^vision_model\.radio_model\.model\.blocks\.", "vision_model.encoder.layer."),
    (r"^(vision_model\.encoder\.layer\.\d+)\.attn\.proj$", r"\1.attention.o_proj"),
    (r"^mlp1\.1$", "multi_modal_projector.linear_1"),
    (r"^mlp1\.3$", "multi_modal_projector.linear_2"),
    (r"^sound_encoder\.encoder\.", "audio_tower."),
    (r"^sound_projection\.linear1$", "embed_audio.linear_1"),
    (r"^sound_projection\.linear2$", "embed_audio.linear_2"),
)
_EXPERT = re.compile(r"(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)")
_RADIO_QKV = re.compile(r"(vision_model\.encoder\.layer\.\d+)\.attn\.qkv")


def runtime_name(released_module: str) -> str:
    name = released_module
    for pattern, repl in _RUNTIME:
        name = re.sub(pattern, repl, name)
    return name


@dataclass
class PeftTensors:
    """What ``adapter_model.safetensors`` and ``adapter_config.json`` hold."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    target_modules: list[str] = field(default_factory=list)
    target_parameters: list[str] = field(default_factory=list)
    experts: dict[tuple[str, str], dict[int, tuple]] = field(default_factory=dict)

    def add(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.tensors[f"base_model.model.{module}.lora_A.weight"] = a.clone()
        self.tensors[f"base_model.model.{module}.lora_B.weight"] = b.clone()
        self.target_modules.append(module)

    def finish_experts(self) -> None:
        """One pair per 3-D expert parameter (see the module docstring)."""
        adapted: dict[str, list[str]] = {}
        for (owner, proj), by_expert in sorted(self.experts.items()):
            adapted.setdefault(owner, []).append(proj)
            order = sorted(by_expert)
            if order != list(range(len(order))):
                raise ValueError(f"{owner}.{proj}: adapters for experts {order}, not all")
            a = torch.cat([by_expert[e][0] for e in order], dim=0)  # [E r, in]
            b = torch.stack([by_expert[e][1] for e in order], dim=-1)  # [out, r, E]
            self.target_parameters.append(f"{owner}.{proj}")
            by_expert.clear()
            self.experts[(owner, proj)] = {"A": a, "B": b.reshape(b.shape[0], -1)}
        for owner, projs in adapted.items():
            params = [p for p in ("up_proj", "down_proj") if p in projs]  # registration order
            for depth, proj in enumerate(reversed(params)):
                path = f"{owner}{'.base_layer' * depth}"
                pair = self.experts[(owner, proj)]
                self.tensors[f"base_model.model.{path}.lora_A.weight"] = pair["A"].clone()
                self.tensors[f"base_model.model.{path}.lora_B.weight"] = pair["B"].clone()


def to_peft(
    out: PeftTensors, module: str, a: torch.Tensor, b: torch.Tensor, section: dict, prefixes
) -> None:
    """Add our adapter of ``module`` (``A`` [r, in], ``B`` [out, r]) under the reference
    model's names."""
    rule = weights.rule_for(f"{module}.weight", section, prefixes)
    for released, b_part in zip(rule.released, rule.to_released(b), strict=True):
        name = runtime_name(module_of(released))
        if m := _EXPERT.fullmatch(name):
            slot = out.experts.setdefault((m.group(1), m.group(3)), {})
            slot[int(m.group(2))] = (a, b_part)
        elif m := _RADIO_QKV.fullmatch(name):
            for x, rows in zip("qkv", b_part.chunk(3, dim=0), strict=True):
                out.add(f"{m.group(1)}.attention.{x}_proj", a, rows)
        else:
            out.add(name, a, b_part)


def write_peft_folder(folder: Path, tensors: PeftTensors, peft: PeftConfig, base: Path) -> None:
    """``adapter_config.json`` (peft's own LoraConfig) and ``adapter_model.safetensors``."""
    from peft import LoraConfig  # lazy: peft imports accelerate (~1 s); only this export needs it
    from safetensors.torch import save_file

    tensors.finish_experts()
    folder.mkdir(parents=True)
    config = LoraConfig(
        r=peft.rank,
        lora_alpha=peft.alpha,
        # peft's expert adapters refuse dropout (an inference-time setting only)
        lora_dropout=0.0 if tensors.target_parameters else peft.dropout,
        target_modules=sorted(tensors.target_modules) or None,
        target_parameters=sorted(tensors.target_parameters) or None,
        base_model_name_or_path=str(base.resolve()),
    )
    config.save_pretrained(str(folder))
    save_file(tensors.tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    json.loads((folder / ADAPTER_CONFIG).read_text())  # written and readable


# ---- import: a PEFT adapter folder back into an adapter checkpoint -----------------------------

# what omni-train's LoRA is (peft's LoraConfig fields that would change the adapters' math)
_PLAIN_LORA = {"use_dora": False, "use_rslora": False, "lora_bias": False, "fan_in_fan_out": False}


def read_peft_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors) of a PEFT LoRA folder, checked to be
    LoRA as omni-train computes it (one rank and alpha, no DoRA / rsLoRA / bias)."""
    from safetensors.torch import load_file

    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r}; only LORA imports")
    other = {k: config.get(k) for k, v in _PLAIN_LORA.items() if bool(config.get(k)) != v}
    if other or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(
            f"{folder}: {other or 'per-module ranks or alphas'} are not plain LoRA "
            "(alpha / r * B A); omni-train's adapters cannot hold them"
        )
    return config, load_file(str(folder / ADAPTER_WEIGHTS))


def _expert_keys(owner: str, config: dict, tensors: dict) -> dict[str, str]:
    """{projection: key prefix} of the 3-D expert parameters adapted on ``owner``."""
    targets = config.get("target_parameters") or []
    adapted = [
        p
        for p in ("up_proj", "down_proj")
        if any(f"{owner}.{p}" == t or f"{owner}.{p}".endswith(f".{t}") for t in targets)
    ]
    return {p: f"base_model.model.{owner}{'.base_layer' * d}"
            for d, p in enumerate(reversed(adapted))}  # fmt: skip


def from_peft(name: str, config: dict, tensors: dict, section: dict, prefixes):
    """Our adapter ``(A, B)`` of module ``name`` from a PEFT state dict, or None when the
    folder does not adapt it. Raises for one adapted in part, or with parts whose A differ
    (our fused linear holds one adapter)."""
    rule = weights.rule_for(f"{name}.weight", section, prefixes)
    pairs = []  # (A, B) of each released tensor, in rule order
    for released in rule.released:
        runtime = runtime_name(module_of(released))
        if m := _EXPERT.fullmatch(runtime):
            owner, expert, proj = m.group(1), int(m.group(2)), m.group(3)
            prefix = _expert_keys(owner, config, tensors).get(proj)
            if prefix is None:
                pairs.append(None)
                continue
            a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            r = config["r"]
            b_expert = b.reshape(b.shape[0], r, -1)[..., expert]  # [out, r E] expert-minor
            pairs.append((a[expert * r : (expert + 1) * r], b_expert))
        elif m := _RADIO_QKV.fullmatch(runtime):
            parts = [_pair(tensors, f"{m.group(1)}.attention.{x}_proj") for x in "qkv"]
            if None in parts:
                pairs.append(None if parts == [None] * 3 else ("partial",))
                continue
            _same_a(name, [p[0] for p in parts])
            pairs.append((parts[0][0], torch.cat([p[1] for p in parts], dim=0)))
        else:
            pairs.append(_pair(tensors, runtime))
    if all(p is None for p in pairs):
        return None
    if any(p is None or len(p) != 2 for p in pairs):
        raise ValueError(f"the adapter covers {name} only in part: it needs all of {rule.released}")
    _same_a(name, [p[0] for p in pairs])
    return pairs[0][0].clone(), rule.to_ours([p[1] for p in pairs]).contiguous()


def _pair(tensors: dict, module: str):
    key = f"base_model.model.{module}.lora_"
    if f"{key}A.weight" not in tensors:
        return None
    return tensors[f"{key}A.weight"], tensors[f"{key}B.weight"]


def _same_a(name: str, a_parts: list[torch.Tensor]) -> None:
    if any(not torch.equal(a, a_parts[0]) for a in a_parts[1:]):
        raise ValueError(
            f"{name} is one linear in omni-train, several in transformers, and the adapter's "
            "parts carry different A matrices: one omni-train adapter cannot hold them (an "
            "adapter exported by omni-train shares A across the parts)"
        )


class _Reads(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _groups_of(model: torch.nn.Module, adapted: set[str]) -> tuple[list[str], list[str]]:
    """(groups, patterns) naming ``adapted``: whole groups where they cover it (so the record
    resolves on any layout), escaped module names for the rest."""
    names = [n for n, _ in model.named_modules()]
    groups, covered = [], set()
    for group, regexes in LORA_GROUPS.items():
        members = {n for n in names if any(re.fullmatch(r, n) for r in regexes)}
        if members and members <= adapted:
            groups.append(group)
            covered |= members
    return groups, [re.escape(n) for n in sorted(adapted - covered)]


def import_adapter(source: Path, base: Path, out: Path):
    """A PEFT LoRA folder (for transformers' reference model) -> an adapter checkpoint in
    ``out`` standing on ``base`` (the omni-train checkpoint of the model it adapts: an import,
    a stage's output_dir or a step folder). Returns the import report."""
    from megatron.core import dist_checkpointing  # lazy: as export.export_hf

    start = time.perf_counter()
    config, tensors = read_peft_folder(source)
    convert._check_out(out)
    ckpt, section, _ = convert.resolve_checkpoint(base)
    model_cfg = convert.model_from_section(section)
    cfg = convert._job(model_cfg, [], "fp32")
    prefixes = weights.Prefixes() if model_cfg.vision is not None else weights.Prefixes.alone("llm")
    report = convert.ImportReport(str(source), "lora_adapter", list(model_cfg.components))
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    with convert.staged(out, "importing") as tmp:
        with convert._MetaModel(cfg) as meta:
            model = meta.model
            regexes = [r for group in LORA_GROUPS.values() for r in group]
            names = [
                n for n, _ in model.named_modules() if any(re.fullmatch(r, n) for r in regexes)
            ]
            found, tensors = {}, _Reads(tensors)
            for name in names:
                pair = from_peft(name, config, tensors, section, prefixes)
                if pair is not None:
                    found[name] = pair
            if not found:
                raise ValueError(f"{source} adapts no module of {base}'s model")
            groups, patterns = _groups_of(model, set(found))
            peft = PeftConfig("lora", rank, alpha, float(config.get("lora_dropout") or 0.0),
                              groups, patterns)  # fmt: skip
            with saved_adapters(model, peft) as targets:
                if set(targets) != set(found):
                    raise RuntimeError(f"targets {sorted(set(targets) ^ set(found))[:4]} differ")
                requests = adapter_requests(model, targets)
                for key, entry in requests.items():
                    module, _, part = key.rpartition(".lora.")
                    entry.data = found[module]["AB".index(part)]
                    report.tensors += 1
                    report.bytes += entry.data.numel() * entry.data.element_size()
                tmp.mkdir(parents=True)
                dist_checkpointing.save({"model": requests}, str(tmp))
        report.notes.append(f"{len(found)} adapted linears, rank {rank}, alpha {alpha}")
        unused = sorted(set(tensors) - tensors.read)
        if unused:  # never dropped silently
            raise ValueError(
                f"{source} adapts modules omni-train's adapters do not cover (groups: "
                f"{', '.join(LORA_GROUPS)}): {unused[:3]}"
            )
        write_record(tmp, make_record(asdict(peft), [], ckpt))
        convert._write_import_manifest(tmp, cfg, report, "source", None)
    report.seconds = time.perf_counter() - start
    return report
