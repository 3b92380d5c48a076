"""Which parallel layouts generation runs on, checked without torch (the front door checks
before it starts any process; the ranks check again), and sequence parallelism switched off
for a while on a model built with it (answer metrics during training)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def without_sequence_parallel(model):
    """Run ``model`` (built with ``parallel.sp=true``) without sequence parallelism inside the
    block: every TransformerConfig it holds and every module's own ``sequence_parallel`` flag
    (megatron's and Transformer Engine's parallel linears copy it at construction) read False,
    then their values are put back. The weights are the same either way; only where the
    activations are split changes, which a decode step of one token per row cannot be.
    megatron's own Mamba inference path flips its output layer's flag the same way."""
    flags, configs = [], {}
    for module in model.modules():
        if getattr(module, "sequence_parallel", None) is True:
            flags.append(module)
        config = getattr(module, "config", None)
        if getattr(config, "sequence_parallel", None) is True:
            configs[id(config)] = config
    for obj in (*flags, *configs.values()):
        obj.sequence_parallel = False
    try:
        yield
    finally:
        for obj in (*flags, *configs.values()):
            obj.sequence_parallel = True
