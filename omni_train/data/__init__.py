"""Data: where micro-batches come from.

Synthetic token sequences (``data.kind=synthetic``), or conversations with media read by
megatron-energon (``data.kind=energon``): conversation -> task encoder (chat template, media
decoding, token accounting) -> micro-batches. Both sit behind one stream interface
(:func:`build_data`; the protocols of :mod:`omni_train.data.microbatch`).
"""

from omni_train.data.batches import MicroBatches, build_data
from omni_train.data.conversation import REASONS, NoUsableSampleError, SampleError, SkipLimitError
from omni_train.data.microbatch import StopDuringWaitError
from omni_train.data.synthetic import SyntheticTokens

__all__ = [
    "REASONS",
    "MicroBatches",
    "SampleError",
    "NoUsableSampleError",
    "SkipLimitError",
    "StopDuringWaitError",
    "SyntheticTokens",
    "build_data",
]
