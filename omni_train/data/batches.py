"""Micro-batches for one data-parallel rank, with a resumable position.

Sample order: step ``k`` consumes global samples ``[k*G, (k+1)*G)`` (G = global batch);
data-parallel rank ``r`` takes the contiguous slice ``r*G/dp ... (r+1)*G/dp`` and cuts it into
micro-batches. Any (dp, micro-batch) layout with the same global batch therefore sees the same
samples per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, TypedDict

import numpy as np
import torch

from omni_train.config import JobConfig
from omni_train.data.microbatch import EvalStream, MicroBatch, StepCounts, TrainStream
from omni_train.data.synthetic import SyntheticTokens


class SyntheticPosition(TypedDict):
    """The data position of a synthetic stream (identical on every rank)."""

    consumed_samples: int
    num_samples: int
    num_tokens: int


class MicroBatches:
    """Iterator of :class:`MicroBatch` (text only, every token carries loss), a
    :class:`~omni_train.data.microbatch.TrainStream` and an
    :class:`~omni_train.data.microbatch.EvalStream`; ``state_dict()`` is the data position for
    checkpoints."""

    def __init__(
        self,
        source: SyntheticTokens,
        *,
        micro_batch_size: int,
        global_batch_size: int,
        dp_size: int,
        dp_rank: int,
        device: torch.device,
        consumed_samples: int = 0,
    ):
        self.source = source
        self.mbs = micro_batch_size
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.device = device
        self.consumed_samples = consumed_samples
        self._queue: list[int] = []

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.mbs

    @property
    def last_keys(self) -> list[str]:
        """Always empty: a synthetic sample has no key (its index is all there is to it)."""
        return []

    def _refill(self) -> None:
        base = self.consumed_samples + self.dp_rank * self.per_rank
        self._queue = list(range(base, base + self.per_rank))
        self.consumed_samples += self.global_batch_size

    def __iter__(self) -> Iterator[MicroBatch]:
        return self

    def __next__(self) -> MicroBatch:
        if not self._queue:
            self._refill()
        indices, self._queue = self._queue[: self.mbs], self._queue[self.mbs :]
        seqs = torch.from_numpy(np.stack([self.source.tokens(i) for i in indices]))
        s = seqs.shape[1] - 1
        batch = MicroBatch(
            tokens=seqs[:, :-1].contiguous().to(torch.int64),
            labels=seqs[:, 1:].contiguous().to(torch.int64),
            loss_mask=torch.ones(len(indices), s, dtype=torch.float32),
            position_ids=torch.arange(s, dtype=torch.int64).expand(len(indices), s).contiguous(),
        )
        return batch.to(self.device)

    def end_step(self) -> StepCounts:
        """The step's samples and tokens (all real: synthetic sequences have no padding)."""
        tokens = self.global_batch_size * self.source.seq_length
        return {"samples": self.global_batch_size, "tokens": tokens, "positions": tokens}

    def restart(self) -> None:
        """Back to the first sample (evaluation reads the same samples every time)."""
        self.consumed_samples = 0
        self._queue = []

    def take_skipped(self) -> dict[str, int]:
        """Always empty: a synthetic sample is never skipped."""
        return {}

    def state_dict(self) -> SyntheticPosition:
        """The data position, identical on every rank."""
        if self._queue:
            raise RuntimeError("data state taken mid-step; save only between optimizer steps")
        seq = self.source.seq_length
        return {
            "consumed_samples": self.consumed_samples,
            "num_samples": self.consumed_samples,
            "num_tokens": self.consumed_samples * seq,
        }

    def rank_state(self) -> None:
        """Nothing per rank: any rank can compute any sample."""
        return None

    def load_state_dict(self, state: Mapping[str, Any], rank_state: bytes | None = None) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._queue = []


def build_data(
    cfg: JobConfig, ps, device: torch.device, stop_requested=None
) -> tuple[TrainStream, EvalStream | None]:
    """(train, eval) micro-batch streams for this rank (``ps``: the parallel state); eval is
    None when energon data is not evaluated (``trainer.eval_iters=0``).

    Both kinds satisfy the protocols of :mod:`omni_train.data.microbatch`: iteration yields
    :class:`MicroBatch`; ``end_step()`` after every optimizer step; ``restart()`` and
    ``take_skipped()`` (eval); ``state_dict()`` (global) and ``rank_state()`` (per rank) for
    checkpoints, ``load_state_dict(state, rank_state)``. ``stop_requested``: a callable
    returning a reason once a stop is asked for; it ends a wait for training data (energon; the
    synthetic streams never wait).
    """
    if cfg.data.kind == "energon":
        # lazy: the loader imports megatron-energon and megatron-core (~5 s); the synthetic
        # streams, the planner and the data tools need neither
        from omni_train.data.loader import build_energon_data

        return build_energon_data(cfg, ps, device, stop_requested)
    return _synthetic(cfg, ps.dp, ps.dp_rank, device)


def _synthetic(
    cfg: JobConfig, dp_size: int, dp_rank: int, device: torch.device
) -> tuple[MicroBatches, MicroBatches]:
    """Eval samples are a disjoint split of the synthetic token sequences."""
    t = cfg.trainer
    media_ids = cfg.model.media_tokens
    first_id = max(media_ids.image, media_ids.video, media_ids.audio) + 1  # text only
    make = lambda split, gbs: MicroBatches(  # noqa: E731
        SyntheticTokens(cfg.model.vocab_size, t.seq_length, t.seed, split, first_id),
        micro_batch_size=t.micro_batch_size,
        global_batch_size=gbs,
        dp_size=dp_size,
        dp_rank=dp_rank,
        device=device,
    )
    eval_gbs = t.micro_batch_size * dp_size * max(t.eval_iters, 1)
    return make("train", t.global_batch_size), make("eval", eval_gbs)
