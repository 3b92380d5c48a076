"""The model a stage trains: megatron-core modules from the typed config (``build.py``), then
the stage's freezing, eval-mode and recompute policies; global parameter counts."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors
from megatron.core.transformer import TransformerConfig

from omni_train.config import JobConfig
from omni_train.model.build import build_omni_model
from omni_train.model.freeze import ComponentCounts, apply_freezing
from omni_train.model.lora import apply_lora
from omni_train.model.omni import EVAL_WHEN_FROZEN, OmniModel
from omni_train.model.recompute import apply_recompute
from omni_train.model.specs import platform_leaves
from omni_train.parallel import ParallelState
from omni_train.platform import Platform


@dataclass
class BuiltModel:
    module: OmniModel  # the megatron module (before the DDP wrapper)
    tf_config: TransformerConfig  # the LM's; DDP and the optimizer use it
    components: dict[str, torch.nn.Module]  # name -> submodule, for freezing and accounting
    counts: dict[str, ComponentCounts]  # global (all ranks) parameter counts per component


def global_parameter_counts(model: OmniModel) -> dict[str, ComponentCounts]:
    """(trainable, frozen) parameter counts per component across every parallel rank.

    Counted from the sharded state dict's global shapes, so the answer is the same for any
    TP/EP layout and counts replicated parameters once. Keys start with the component name.
    """
    params = {p.data_ptr(): p for p in model.parameters()}
    sharded, _ = extract_sharded_tensors(model.sharded_state_dict())
    seen: set[str] = set()
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for item in sharded.values():
        assert isinstance(item, ShardedTensor)
        param = params.get(item.data.data_ptr())
        if param is None or item.key in seen:
            continue
        seen.add(item.key)
        numel = math.prod(item.global_shape)
        component = counts[item.key.split(".", 1)[0]]
        component[0 if param.requires_grad else 1] += numel
        if ".lora." in item.key:
            component[2] += numel
    return {name: ComponentCounts(*counts[name]) for name in model.components()}


def build_model(cfg: JobConfig, ps: ParallelState, platform: Platform) -> BuiltModel:
    model, tf_config = build_omni_model(cfg, ps, platform, platform_leaves(platform))
    model = model.to(platform.device)
    components = model.components()
    apply_freezing(components, cfg.stage.trainable)  # before DDP: frozen params get no buffers
    if cfg.peft.enabled:  # adapters, their bases frozen: also before DDP
        apply_lora(model, cfg.peft, cfg.stage.trainable, cfg.trainer.seed)
    frozen = [name for name in components if name not in cfg.stage.trainable]
    eval_components = []
    if cfg.stage.frozen_encoders_eval:
        eval_components = [name for name in frozen if name in EVAL_WHEN_FROZEN]
    model.set_mode_policy(eval_components, cfg.stage.eval_parts)
    apply_recompute(model, cfg.recompute)
    return BuiltModel(model, tf_config, components, global_parameter_counts(model))
