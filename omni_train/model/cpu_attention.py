"""Core attention for the CPU platform, with packed (THD) sequences.

megatron-core's local ``DotProductAttention`` rejects ``packed_seq_params``; packed attention
exists only in Transformer Engine (cuDNN/flash varlen kernels). This stand-in computes the same
thing with ``torch.nn.functional.scaled_dot_product_attention``: grouped-query attention, causal
or bidirectional, and for packed input a block-diagonal mask built from ``cu_seqlens`` so no token
attends across a sample (or image) boundary. It has no parameters, like TE's core attention, so
checkpoints are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


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
        if config.context_parallel_size > 1:
            raise NotImplementedError(
                "context parallel attention on the CPU platform arrives with issue #7"
            )

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
        if packed:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
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
