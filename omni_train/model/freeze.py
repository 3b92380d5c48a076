"""Per-stage freezing: a closed policy over the component names the model declares.

A frozen component is frozen entirely, not only its parameters:

- ``requires_grad=False`` before DDP and the optimizer exist, so it gets no gradient, no DDP
  buffer space and no optimizer state;
- a frozen LM's MoE routers stop counting tokens per expert. megatron-core updates the
  aux-loss-free expert bias (a buffer, not a parameter) from those counts in
  ``finalize_model_grads`` whether or not the LM trains; with no counts the update is zero
  and the routing stays as loaded;
- frozen encoders run in eval mode (``OmniModel.set_mode_policy``; ``stage.frozen_encoders_eval``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ComponentCounts:
    trainable: int  # adapters included
    frozen: int
    adapter: int = 0  # LoRA adapter parameters (peft), of the trainable ones


def apply_freezing(components: dict[str, torch.nn.Module], trainable: list[str]) -> None:
    """Set ``requires_grad`` per component (``trainable`` lists component names) and stop the
    expert-bias updates of frozen MoE routers.

    Must run before DDP and the optimizer are built, so that frozen parameters get no gradient
    buffer and no optimizer state.
    """
    unknown = sorted(set(trainable) - set(components))
    if unknown:
        raise ValueError(
            f"stage.trainable names unknown components {unknown}; "
            f"this model declares: {', '.join(components)}"
        )
    for name, module in components.items():
        trains = name in trainable
        for param in module.parameters():
            param.requires_grad_(trains)
        if not trains:
            stop_expert_bias_updates(module)


def stop_expert_bias_updates(module: torch.nn.Module) -> None:
    """Stop the aux-loss-free expert-bias updates of every MoE router in ``module`` (its
    routing keeps the loaded bias): megatron's TopKRouter reads ``enable_expert_bias`` on every
    forward (``_apply_expert_bias``) to count tokens per expert, and no counts leave the bias as
    it is."""
    for sub in module.modules():
        if getattr(sub, "expert_bias", None) is not None and hasattr(sub, "enable_expert_bias"):
            sub.enable_expert_bias = False
