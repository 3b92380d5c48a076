"""The contract between the data side and the model: one micro-batch, typed.

The loaders (:mod:`omni_train.data.loader` for energon data, :mod:`omni_train.data.batches` for
synthetic tokens) produce it; the forward step (:mod:`omni_train.training.forward_step`) is its
only consumer. Both import this module, so a field cannot be renamed on one side only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from omni_train.data.media import Media

if TYPE_CHECKING:
    from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class MicroBatch:
    """``tokens``/``labels``/``position_ids`` int64 ``[b, s]``, ``loss_mask`` float32 ``[b, s]``
    (1 = the token's label carries loss; 0 on padding); ``labels[:, i]`` is the token after
    ``tokens[:, i]``. ``media``: the images, videos and audio clips with the row (or packed
    segment) each belongs to. Packed (THD): ``b == 1`` and ``packed_seq_params`` marks the
    samples (``cu_seqlens`` over the ``s`` tokens); None when unpacked. ``categories``: the
    dataset category of each sample (bookkeeping; the model ignores it)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    media: Media = field(default_factory=Media)
    packed_seq_params: PackedSeqParams | None = None
    categories: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        shapes = {n: tuple(getattr(self, n).shape) for n in ("tokens", "labels", "loss_mask")}
        shapes["position_ids"] = tuple(self.position_ids.shape)
        if len(set(shapes.values())) != 1 or len(shapes["tokens"]) != 2:
            raise ValueError(
                f"MicroBatch: tokens, labels, loss_mask, position_ids must all be [b, s]: {shapes}"
            )
        for name in ("tokens", "labels", "position_ids"):
            if getattr(self, name).dtype != torch.int64:
                raise ValueError(
                    f"MicroBatch: {name} must be int64, got {getattr(self, name).dtype}"
                )
        if self.packed_seq_params is not None and self.tokens.shape[0] != 1:
            raise ValueError(
                f"MicroBatch: a packed micro-batch has one row, got {self.tokens.shape[0]}"
            )

    def to(self, device: torch.device) -> MicroBatch:
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(
            move(self.tokens),
            move(self.labels),
            move(self.loss_mask),
            move(self.position_ids),
            self.media.to(device),
            self.packed_seq_params,
            list(self.categories),
        )


class StopDuringWaitError(Exception):
    """A stop was asked for while the rank waited for its next training micro-batch (which
    may never come when no sample is usable): the step in progress is abandoned, nothing of it
    reaches a checkpoint, the last checkpoint is the one to resume."""
