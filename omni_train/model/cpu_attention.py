"""Core attention for the CPU platform, with packed (THD) sequences.

megatron-core's local ``DotProductAttention`` rejects ``packed_seq_params``; packed attention
exists only in Transformer Engine (cuDNN/flash varlen kernels). This stand-in computes the same
thing with ``torch.nn.functional.scaled_dot_product_attention``: grouped-query attention, causal
or bidirectional, and for packed input a block-diagonal mask built from ``cu_seqlens`` so no token
attends across a sample (or image) boundary. It has no parameters, like TE's core attention, so
checkpoints are unaffected.

Context parallel (``config.context_parallel_size > 1``): query, key and value hold this CP
rank's load-balanced shard of the sequence (``omni_train.parallel.context``). Keys and values
are all-gathered over the CP group (megatron's ``all_gather`` CP communication; the backward
reduce-scatters their gradients back to their owners), and the mask is built from the tokens'
global positions: causal order and, for packed input, the sample boundaries. Dense masks are
``[s/cp, s]``: fine for the CPU platform's small contexts (on GPU, Transformer Engine's ring
attention is used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from omni_train.parallel.context import gathered_positions


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` int64: the segment index of every token; tokens past ``cu_seqlens[-1]``
    (padding of the packed buffer) form one extra segment of their own."""
    bounds = cu_seqlens.to(torch.int64)
    lengths = torch.diff(bounds, append=bounds.new_tensor([total]))
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=bounds.device), lengths)


class TorchDotProductAttention(MegatronModule):
    """Drop-in for ``TEDotProductAttention`` on CPU (same constructor and forward contract).

    Unpacked input: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``; output
    ``[sq, b, np*hn]``. Packed (``packed_seq_params.qkv_format == "thd"``): query ``[t, np, hn]``,
    key/value ``[t, ng, hn]`` with ``cu_seqlens`` ``[num_seqs + 1]``; output ``[t, np*hn]``.
    ``np``/``ng`` are the heads/groups local to this tensor-parallel rank.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )
        self.cp = config.context_parallel_size
        self.cp_group = None
        if self.cp > 1:
            if pg_collection is None:
                from megatron.core import parallel_state as mpu

                self.cp_group = mpu.get_context_parallel_group()
            else:
                self.cp_group = pg_collection.cp

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported on the CPU platform")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed:  # [t, n, d] -> [1, n, t, d]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
        else:  # [s, b, n, d] -> [b, n, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        mask = None
        cu = None
        if packed:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
        if self.cp > 1:
            if attention_mask is not None and not packed:
                raise NotImplementedError("an explicit attention mask under context parallel")
            k, v = (self._gather_kv(x) for x in (k, v))
            mask = self._cp_mask(q.shape[2] * self.cp, cu, causal, q.device)
        elif packed:
            seg = segment_ids(cu, q.shape[2])
            mask = seg[:, None] == seg[None, :]
            if causal:
                mask = torch.tril(mask)
        elif attention_mask is not None:
            mask = ~attention_mask.bool()  # megatron: True = masked out
            if causal:
                mask = mask & torch.ones_like(mask).tril()
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=causal and mask is None,
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        if packed:  # [1, n, t, d] -> [t, n*d]
            return out.squeeze(0).transpose(0, 1).reshape(out.shape[2], -1)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def _gather_kv(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, n, s/cp, d]`` -> ``[b, n, s, d]`` in rank order (gradients reduce-scattered)."""
        seq_first = x.permute(2, 0, 1, 3).contiguous()
        full = gather_from_sequence_parallel_region(seq_first, True, group=self.cp_group)
        return full.permute(1, 2, 0, 3)

    def _cp_mask(
        self, total: int, cu: torch.Tensor | None, causal: bool, device: torch.device
    ) -> torch.Tensor:
        """``[s/cp, s]`` bool (True = attend) between this rank's queries and the gathered keys."""
        pos_k = gathered_positions(total, self.cp, cu).to(device)
        pos_q = pos_k.view(self.cp, -1)[self.cp_group.rank()]  # this rank's shard, in order
        mask = torch.ones(pos_q.numel(), pos_k.numel(), dtype=torch.bool, device=device)
        if cu is not None:
            seg = segment_ids(cu, total)
            mask &= seg[pos_q][:, None] == seg[pos_k][None, :]
        if causal:
            mask &= pos_k[None, :] <= pos_q[:, None]
        return mask
