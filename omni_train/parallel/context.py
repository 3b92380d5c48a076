"""Context parallelism: which tokens of a micro-batch each CP rank holds.

megatron-core's load-balanced layout: a sequence is cut into ``2 x cp`` equal chunks and CP rank
``r`` holds chunks ``r`` and ``2cp-1-r``, so every rank gets the same share of causal-attention
work. A packed (THD) micro-batch is split the same way *per sample* (each sample padded to a
multiple of ``2 x cp``): Transformer Engine's ``thd_get_partitioned_indices``, which megatron's
Mamba context-parallel path also calls to undo and redo this layout around the SSM.

Data flow under CP: every rank of a CP group reads the same micro-batch and embeds only its
shard of the tokens (:func:`shard_index`); the media encoders are sharded over the group, each
rank encoding its share of the media items, and every feature row is sent to the rank that holds
its placeholder's position (:func:`~omni_train.platform.kernels.cp_layout.position_owner`,
``omni_train.parallel.encoder_shard``). The
forward step cuts labels and loss mask to the same positions. The LM runs on the shard: attention
exchanges keys/values over the CP group, Mamba layers switch to head-parallel with an all-to-all.
Encoder gradients are summed over the CP group by megatron's DDP (it reduces over data x context
parallel ranks).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as mpu

from omni_train.platform.kernels.cp_layout import partitioned_indices


def shard_index(seq_length: int, packed_seq_params=None) -> torch.Tensor | None:
    """This rank's positions under context parallelism (None without CP)."""
    cp = mpu.get_context_parallel_world_size()
    if cp == 1:
        return None
    cu = padded_bounds(packed_seq_params)
    return partitioned_indices(seq_length, cp, mpu.get_context_parallel_rank(), cu)


def padded_bounds(packed_seq_params=None) -> torch.Tensor | None:
    """The padded ``cu_seqlens`` a packed micro-batch is cut by (None unpacked)."""
    if packed_seq_params is None:
        return None
    cu = packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q if cu is None else cu
