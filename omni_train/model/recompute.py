"""Activation recompute per component (``recompute.*``): trade compute for activation memory.

Where a component is megatron-core's, its own options do it (:func:`lm_options`,
:func:`vision_options`, passed into that component's ``TransformerConfig``). megatron-core has
nothing for our own call sites and NeMo's ConformerEncoder has no recompute option, so for the
audio encoder (per conformer layer) and the projectors we checkpoint with
``torch.utils.checkpoint`` (non-reentrant: gradients reach parameters even when the input needs
none, e.g. a trainable projector on a frozen encoder's output).

Recompute must not change results. Two things would, and are handled here: the RNG (dropout
draws the same masks; torch's checkpoint restores the RNG state) and BatchNorm running
statistics, which a recomputed forward would update a second time; they are held during
recomputation.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from omni_train.config.training import RecomputeConfig


def lm_options(r: RecomputeConfig) -> dict:
    """megatron-core selective recompute for the LM's TransformerConfig."""
    if not r.lm:
        return {}
    return {"recompute_granularity": "selective", "recompute_modules": list(r.lm)}


def vision_options(r: RecomputeConfig) -> dict:
    """megatron-core full recompute of every ViT block (one block per checkpoint)."""
    if not r.vision_encoder:
        return {}
    return {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": 1,
    }


@contextlib.contextmanager
def _running_stats_frozen(module: torch.nn.Module) -> Iterator[None]:
    """BatchNorm in train mode normalises by batch statistics either way; during recomputation
    its running statistics must not move again. Momentum 0 keeps them (``(1 - 0) * running +
    0 * batch``) while the same tensors are saved for backward as in the first forward (without
    running statistics the recomputation would save fewer, which torch's checkpoint rejects)."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    saved = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _contexts(module: torch.nn.Module):
    return contextlib.nullcontext(), _running_stats_frozen(module)


def _checkpointed(owner: torch.nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` keeping only its inputs; the forward is re-run in backward with
    ``owner``'s BatchNorm statistics held. Outside training (or without autograd) a plain call."""
    if not (owner.training and torch.is_grad_enabled()):
        return fn(*args, **kwargs)
    return checkpoint(
        fn, *args, use_reentrant=False, context_fn=functools.partial(_contexts, owner), **kwargs
    )


def recomputed(module: torch.nn.Module, *args, **kwargs):
    """``module(*args, **kwargs)``, recomputed in backward (see :func:`_checkpointed`)."""
    return _checkpointed(module, module, *args, **kwargs)


def _recompute_forward(layer: torch.nn.Module) -> None:
    """Make every call of ``layer`` recomputed, keeping the module (and its parameter names)."""
    layer.forward = functools.partial(_checkpointed, layer, layer.forward)


def apply_recompute(model, r: RecomputeConfig) -> None:
    """Our own modules: every conformer layer of the audio encoder; the projectors (their call
    sites in OmniModel). The LM's and ViT's recompute are set in their TransformerConfigs."""
    if r.audio_encoder and model.audio_encoder is not None:
        for layer in model.audio_encoder.encoder.layers:
            _recompute_forward(layer)
    model.recompute_projectors = r.projectors
