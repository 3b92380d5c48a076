"""Pure-PyTorch versions of megatron's Triton inference tensor ops, for the CPU platform.

``megatron.core.ssm.mamba_mixer`` imports
``megatron.core.inference.contexts.attention_context.triton.tensor_ops`` at module level, and
that module imports ``triton`` (a CUDA-only compiler, not installed on the CPU platform). The
three functions it exports are row copies used by the mixer's dynamic-inference paths; this
module implements the same contracts with indexing and is registered under megatron's module
name before the mixer is imported (only when that module cannot be imported). Training never
calls them.
"""

from __future__ import annotations

import torch

MODULE = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def tensor_get_slice_after(
    input_tensor: torch.Tensor,
    output_tensor: torch.Tensor,
    pos_on_device: torch.Tensor,
    check_bounds: bool = False,
) -> None:
    """``output[:n] = input[pos:]`` with ``n = min(len(input) - pos, len(output))``."""
    pos = int(pos_on_device.reshape(-1)[0])
    if check_bounds and not 0 <= pos <= input_tensor.shape[0]:
        raise AssertionError("pos_on_device must be between 0 and input_tensor.shape[0]")
    n = min(input_tensor.shape[0] - pos, output_tensor.shape[0])
    if n > 0:
        output_tensor[:n].copy_(input_tensor[pos : pos + n])


def tensor_merge(
    tensor_a: torch.Tensor,
    tensor_b: torch.Tensor,
    pos_on_device: torch.Tensor,
    output_tensor: torch.Tensor | None = None,
    check_bounds: bool = False,
) -> None:
    """``out[:pos] = a[:pos]``; ``out[pos:pos + len(b)] = b`` (clipped to ``out``); in place
    on ``a`` when ``output_tensor`` is None."""
    out = tensor_a if output_tensor is None else output_tensor
    pos = int(pos_on_device.reshape(-1)[0])
    if check_bounds and not 0 <= pos <= tensor_a.shape[0]:
        raise AssertionError("pos_on_device must be between 0 and tensor_a batch size")
    if out is not tensor_a and pos > 0:
        out[:pos].copy_(tensor_a[:pos])
    n = max(0, min(tensor_b.shape[0], out.shape[0] - pos))
    if n:
        out[pos : pos + n].copy_(tensor_b[:n])


def tensor_masked_update(states: torch.Tensor, idx: torch.Tensor, new_states: torch.Tensor):
    """``states[idx[i]] = new_states[i]`` for every ``idx[i] != -1``."""
    if idx.ndim != 1 or states.shape[1:] != new_states.shape[1:]:
        raise AssertionError("idx must be 1-D and state dimensions must match")
    keep = idx != -1
    states[idx[keep].long()] = new_states[: idx.shape[0]][keep].to(states.dtype)
