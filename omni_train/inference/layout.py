"""Which parallel layouts generation runs on, checked without torch (the front door checks
before it starts any process; the ranks check again)."""

from __future__ import annotations

import dataclasses

from omni_train.config.parallel import ParallelConfig


def generation_parallel(p: ParallelConfig) -> ParallelConfig:
    """``p`` with sequence parallel off (a decode step has one token per row, and megatron's
    static Mamba path asserts it off). Raises ValueError for context or pipeline parallel:
    megatron's static Mamba decode asserts no CP, and the loop runs the whole model in each
    process."""
    if p.cp > 1 or p.pp > 1:
        raise ValueError(
            f"omni-train generate runs without context and pipeline parallelism, got "
            f"parallel.cp={p.cp} parallel.pp={p.pp}; use tensor / expert parallelism"
        )
    return dataclasses.replace(p, sp=False)
