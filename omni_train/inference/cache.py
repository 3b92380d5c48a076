"""The generation cache: megatron-core's static inference context, filled one row at a time
and merged into one batch.

megatron-core 0.16.1 keeps, per layer, in ``StaticInferenceContext.key_value_memory_dict``:

- attention layers (``Attention._adjust_key_value_for_inference``): keys and values
  ``[max_seq, max_batch, groups/tp, head_dim]``;
- Mamba layers (``MambaMixer._get_states_from_cache``): the conv state ``[b, conv_dim/tp,
  d_conv]`` and the SSM state ``[b, heads/tp, head_dim, d_state]``; a decode step
  (``MambaMixer._decode``) advances both by one token in place.

What megatron lacks, written here: a static context has one sequence offset for the whole batch
and Mamba's state cache ignores the batch offset, so rows of different prompt lengths cannot be
prefilled together exactly. Each row is prefilled alone (batch 1, its exact length, its media),
then the rows' caches are merged: Mamba states stacked; each row's keys and values
**right-aligned** in a cache as long as the longest prompt (``[P - P_i, P)``), the empty slots
in front masked at every decode step (:func:`key_padding_mask`). Right-aligning moves a row's
keys to other positions, which is exact only because the LM has no positional embedding
(``position_embedding_type="none"``: no RoPE in the cache).
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from omni_train.data.media import Media


def _is_mamba_mixer(module: torch.nn.Module) -> bool:
    # by attributes: importing megatron's mamba_mixer module needs platform.setup()'s patches
    # (MambaLayer and MambaStack also answer mamba_state_shapes_per_request; only the mixer
    # keeps the states)
    return hasattr(module, "_get_states_from_cache") and hasattr(module, "layer_number")


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "_adjust_key_value_for_inference") and hasattr(module, "layer_number")


def prefill_row(
    model, input_ids: torch.Tensor, media: Media | None, max_length: int
) -> tuple[StaticInferenceContext, torch.Tensor]:
    """One prompt ``input_ids`` ``[1, P]`` with its media through ``model`` (an ``OmniModel``
    in eval mode): (its cache, the next-token logits ``[1, V]``). ``max_length`` (>= P) sizes
    the attention cache."""
    ctx = StaticInferenceContext(max_batch_size=1, max_sequence_length=max_length)
    logits = model.generate_step(input_ids, media, ctx)
    ctx.increment_sequence_len_offset(input_ids.shape[1])
    return ctx, logits


def merge_rows(
    model, rows: list[StaticInferenceContext], prompt_lengths: list[int], max_length: int
) -> StaticInferenceContext:
    """One decode-mode context for ``len(rows)`` rows from their prefill contexts: the next
    step writes position ``max(prompt_lengths)``; ``max_length`` (>= that + new tokens) sizes
    the attention cache. The SSM states are kept in fp32 (as transformers keeps its recurrent
    state), whatever the model's dtype."""
    b, longest = len(rows), max(prompt_lengths)
    ctx = StaticInferenceContext(max_batch_size=b, max_sequence_length=max_length)
    for module in model.llm.modules():
        if _is_mamba_mixer(module):
            layer = module.layer_number
            conv = torch.cat([r.key_value_memory_dict[layer][0] for r in rows])
            ssm = torch.cat([r.key_value_memory_dict[layer][1] for r in rows]).float()
            ctx.key_value_memory_dict[layer] = (conv, ssm)
            # megatron re-allocates (zeros) the states of a layer whose cached batch size
            # differs from the step's (MambaMixer._get_states_from_cache): say they are b rows
            module.cached_batch_size = b
        elif _is_attention(module):
            layer = module.layer_number
            k0, v0 = rows[0].key_value_memory_dict[layer]
            keys = k0.new_zeros(max_length, b, *k0.shape[2:])
            values = v0.new_zeros(max_length, b, *v0.shape[2:])
            for i, (row, n) in enumerate(zip(rows, prompt_lengths, strict=True)):
                k, v = row.key_value_memory_dict[layer]
                keys[longest - n : longest, i] = k[:n, 0]
                values[longest - n : longest, i] = v[:n, 0]
            ctx.key_value_memory_dict[layer] = (keys, values)
    ctx.sequence_len_offset = longest
    ctx.enable_decode_mode()
    return ctx


def key_padding_mask(
    prompt_lengths: list[int], ctx: StaticInferenceContext, device: torch.device
) -> torch.Tensor:
    """``[b, 1, 1, sk]`` bool for the next decode step of a merged context (``sk`` =
    ``ctx.sequence_len_offset + 1`` keys): True (megatron: masked out) on the empty slots in
    front of each shorter prompt."""
    longest = max(prompt_lengths)
    empty = torch.tensor([longest - n for n in prompt_lengths], device=device)
    keys = torch.arange(ctx.sequence_len_offset + 1, device=device)
    return (keys[None, :] < empty[:, None])[:, None, None, :]
