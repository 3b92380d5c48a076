"""The forward step: the one place that knows what a batch holds and how loss is computed.

Loss convention (megatron ``calculate_per_token_loss``): the step returns the *sum* of token
losses and the number of loss tokens; megatron adds both up over micro-batches and data-parallel
ranks and divides gradients by the global token count. Padding and masked tokens never count.
"""

from __future__ import annotations

from functools import partial

import torch

from omni_train.parallel.context import shard_index


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """output_tensor: per-token losses [b, s]; loss_mask: [b, s] (1 = counts)."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output_tensor.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    # Reported as (sum, count) so the logger can average over micro-batches and ranks exactly.
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    """Context parallel: every CP rank gets the whole micro-batch; the model embeds it and keeps
    this rank's positions, so labels and loss mask are cut to the same positions here."""
    batch = next(data_iterator)
    packed = batch.get("packed_seq_params")
    labels, loss_mask = batch["labels"], batch["loss_mask"]
    cp_index = shard_index(labels.shape[1], packed)
    if cp_index is not None:
        cp_index = cp_index.to(labels.device)
        labels, loss_mask = (x.index_select(1, cp_index) for x in (labels, loss_mask))
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],  # unused: Nemotron-H has no position embedding
        attention_mask=None,  # causal masking is built into the attention layers
        labels=labels,
        media=batch.get("media"),  # omni_train.data.media.Media, or None for text-only
        packed_seq_params=packed,
        cp_index=cp_index,
    )
    return output, partial(loss_func, loss_mask)
