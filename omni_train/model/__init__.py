"""Model build: megatron-core modules from the typed config, then the stage's freezing policy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors
from megatron.core.transformer import TransformerConfig

from omni_train.config import JobConfig
from omni_train.model.freeze import ComponentCounts, apply_freezing
from omni_train.model.lm import build_language_model
from omni_train.parallel import ParallelState
from omni_train.platform import Platform


@dataclass
class BuiltModel:
    module: torch.nn.Module  # the megatron module (before the DDP wrapper)
    tf_config: TransformerConfig
    components: dict[str, torch.nn.Module]  # name -> submodule, for freezing and accounting
    counts: dict[str, ComponentCounts]  # global (all ranks) parameter counts per component


def global_parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of the whole model across every parallel rank.

    Counted from the sharded state dict's global shapes, so the answer is the same for any
    TP/EP layout and counts replicated parameters once.
    """
    params = {p.data_ptr(): p for p in module.parameters()}
    sharded, _ = extract_sharded_tensors(module.sharded_state_dict())
    seen: set[str] = set()
    trainable = frozen = 0
    for item in sharded.values():
        assert isinstance(item, ShardedTensor)
        param = params.get(item.data.data_ptr())
        if param is None or item.key in seen:
            continue
        seen.add(item.key)
        numel = math.prod(item.global_shape)
        if param.requires_grad:
            trainable += numel
        else:
            frozen += numel
    return trainable, frozen


def build_model(cfg: JobConfig, ps: ParallelState, platform: Platform) -> BuiltModel:
    lm, tf_config = build_language_model(cfg, ps, platform)
    components = {"llm": lm}
    apply_freezing(components, cfg.stage.trainable)  # before DDP: frozen params get no buffers
    counts = {
        name: ComponentCounts(*global_parameter_counts(module))
        for name, module in components.items()
    }
    return BuiltModel(lm, tf_config, components, counts)
