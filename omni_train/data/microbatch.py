"""The contract between the data side and the trainer: one micro-batch and the streams of them,
typed.

The loaders (:mod:`omni_train.data.loader` for energon data, :mod:`omni_train.data.batches` for
synthetic tokens) produce :class:`MicroBatch`; the forward step
(:mod:`omni_train.training.forward_step`) is its only consumer. Both import this module, so a
field cannot be renamed on one side only. The streams that hand micro-batches out satisfy
:class:`DataStream`, and :class:`TrainStream` or :class:`EvalStream` for what the training loop,
the evaluation and the stage runner ask of them (counts, skipped samples, the keys of the last
micro-batch, the data position for checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NotRequired, Protocol, TypedDict

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


class StepCounts(TypedDict):
    """One optimizer step's data, summed over the data-parallel ranks: ``samples``, real
    ``tokens``, ``positions`` (tokens with padding) and, when any sample was skipped,
    ``skipped`` (reason -> count)."""

    samples: int
    tokens: int
    positions: int
    skipped: NotRequired[dict[str, int]]


class DataStream(Protocol):
    """A data-parallel rank's stream of micro-batches (every training and evaluation stream).

    ``last_keys``: the sample keys of the micro-batch handed out last, for the error that names
    them when its step fails (empty where samples have no keys: synthetic tokens)."""

    @property
    def last_keys(self) -> list[str]: ...

    def __iter__(self) -> Iterator[MicroBatch]: ...

    def __next__(self) -> MicroBatch: ...


class TrainStream(DataStream, Protocol):
    """The training stream: ``num_microbatches`` per optimizer step, then ``end_step()``
    (collective over the data-parallel group; it raises when too many samples were skipped);
    the data position for checkpoints as ``state_dict()`` (global, identical on every rank) and
    ``rank_state()`` (this rank's, None when a rank has none), restored by
    ``load_state_dict(state, rank_state)``."""

    @property
    def num_microbatches(self) -> int: ...

    def end_step(self) -> StepCounts: ...

    def state_dict(self) -> Mapping[str, Any]: ...

    def rank_state(self) -> bytes | None: ...

    def load_state_dict(self, state: Mapping[str, Any], rank_state: bytes | None) -> None: ...


class EvalStream(DataStream, Protocol):
    """The held-out stream: ``restart()`` goes back to its first sample (every evaluation reads
    the same ones); ``take_skipped()`` returns the samples skipped per reason, all data-parallel
    ranks, since the last call (collective over the data-parallel group)."""

    def restart(self) -> None: ...

    def take_skipped(self) -> dict[str, int]: ...


class StopDuringWaitError(Exception):
    """A stop was asked for while the rank waited for its next training micro-batch (which
    may never come when no sample is usable): the step in progress is abandoned, nothing of it
    reaches a checkpoint, the last checkpoint is the one to resume."""
