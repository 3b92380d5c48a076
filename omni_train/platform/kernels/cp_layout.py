"""The context-parallel token layout as index math: which positions of a sequence each CP rank
holds (megatron-core's load-balanced layout, see :mod:`omni_train.parallel.context`).

Pure PyTorch on any device and no process groups, so the kernels (attention's CP stand-in) and
the stand-ins for Transformer Engine (``thd_get_partitioned_indices``) use it from below the
parallel layer; :mod:`omni_train.parallel.context` applies it to this rank's group.
"""

from __future__ import annotations

import torch


def thd_partitioned_indices(
    cu_seqlens: torch.Tensor, total_tokens: int, world_size: int, rank: int
) -> torch.Tensor:
    """Pure-PyTorch ``transformer_engine_torch.thd_get_partitioned_indices`` (a CUDA kernel).

    ``cu_seqlens`` int [n+1], padded boundaries with every sample length divisible by
    ``2 x world_size`` and ``cu_seqlens[-1] == total_tokens``. Returns int32
    ``[total_tokens / world_size]``: for each sample in order, the global indices of its chunks
    ``rank`` and ``2*world_size-1-rank`` (each ``len / (2*world_size)`` tokens).
    """
    bounds = cu_seqlens.to(torch.int64).tolist()
    if bounds[-1] != total_tokens:
        raise ValueError(
            f"packed sequence of {total_tokens} tokens but cu_seqlens ends at {bounds[-1]}; "
            "context parallel needs the padded boundaries to cover every token"
        )
    two_cp = 2 * world_size
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        if length % two_cp:
            raise ValueError(
                f"a packed sample of {length} tokens is not divisible by 2 x cp = {two_cp}; "
                "pad every sample to a multiple of 2 x cp (data.packing.sample_pad_multiple)"
            )
        chunk = length // two_cp
        for c in (rank, two_cp - 1 - rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return out.to(device=cu_seqlens.device, dtype=torch.int32)


def partitioned_indices(
    seq_length: int, cp: int, rank: int, cu_seqlens_padded: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 ``[seq_length / cp]``: the positions (along the sequence) CP rank ``rank`` holds.
    Unpacked: chunks ``rank`` and ``2cp-1-rank`` of the sequence; packed: per sample."""
    if cu_seqlens_padded is not None:
        return _thd_indices(cu_seqlens_padded, seq_length, cp, rank).to(torch.int64)
    if seq_length % (2 * cp):
        raise ValueError(
            f"a sequence of {seq_length} tokens is not divisible by 2 x cp = {2 * cp}; "
            "pad micro-batches to a multiple of 2 x cp"
        )
    chunk = seq_length // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)])


def _thd_indices(cu: torch.Tensor, total: int, cp: int, rank: int) -> torch.Tensor:
    """TE's CUDA kernel where it runs (the indices megatron's Mamba CP path uses), else ours."""
    if cu.is_cuda:
        try:
            import transformer_engine_torch as tex
        except ImportError:
            tex = None
        if tex is not None:
            return tex.thd_get_partitioned_indices(cu.to(torch.int32), total, cp, rank)
    return thd_partitioned_indices(cu, total, cp, rank)


def gathered_positions(
    seq_length: int, cp: int, cu_seqlens_padded: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 ``[seq_length]``: the global position of each token after an all-gather of the CP
    shards along the sequence (rank 0's shard, then rank 1's, ...)."""
    return torch.cat([partitioned_indices(seq_length, cp, r, cu_seqlens_padded) for r in range(cp)])


def position_owner(
    seq_length: int, cp: int, cu_seqlens_padded: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 ``[seq_length]``: the CP rank that holds each position (sharded media encoding
    sends a feature row to the rank of its placeholder's position)."""
    owner = torch.empty(seq_length, dtype=torch.int64)
    for r in range(cp):
        owner[partitioned_indices(seq_length, cp, r, cu_seqlens_padded).cpu()] = r
    return owner
