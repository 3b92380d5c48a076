"""Per-stage freezing: a closed policy over the component names the model declares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ComponentCounts:
    trainable: int
    frozen: int


def apply_freezing(components: dict[str, torch.nn.Module], trainable: list[str]) -> None:
    """Set ``requires_grad`` per component (``trainable`` lists component names).

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
        for param in module.parameters():
            param.requires_grad_(name in trainable)
