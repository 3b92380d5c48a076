"""Deterministic, learnable synthetic token sequences (no files, no tokenizer).

Sample ``i`` is an arithmetic progression modulo the vocabulary, with start and stride drawn from
a generator seeded by (seed, split, i): any rank can produce any sample without coordination,
and the next token is predictable from the two before it, so the loss visibly falls. Ids below
``first_id`` (special tokens such as the media placeholders) never occur.
"""

from __future__ import annotations

import numpy as np

_SPLIT_IDS = {"train": 0, "eval": 1}
_MAX_STRIDE = 7


class SyntheticTokens:
    def __init__(
        self, vocab_size: int, seq_length: int, seed: int, split: str = "train", first_id: int = 0
    ):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {list(_SPLIT_IDS)}, got {split!r}")
        if not 0 <= first_id < vocab_size - 1:
            raise ValueError(f"first_id={first_id} leaves no text ids below {vocab_size}")
        self.first_id = first_id
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.split = split

    def tokens(self, index: int) -> np.ndarray:
        """Return ``seq_length + 1`` token ids (int64): inputs are [:-1], labels are [1:]."""
        rng = np.random.default_rng((self.seed, _SPLIT_IDS[self.split], index))
        num_ids = self.vocab_size - self.first_id
        start = int(rng.integers(0, num_ids))
        stride = int(rng.integers(1, _MAX_STRIDE + 1))
        steps = np.arange(self.seq_length + 1, dtype=np.int64)
        return self.first_id + (start + stride * steps) % num_ids
