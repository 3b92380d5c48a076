"""Core attention without Transformer Engine, with packed (THD) sequences and context parallel.

megatron-core's local ``DotProductAttention`` rejects ``packed_seq_params``; packed attention
exists only in Transformer Engine (cuDNN/flash varlen kernels). This stand-in computes the same
thing with one of two PyTorch backends, from one definition of who attends whom
(:class:`DocumentMask`: segment ids and positions of every query and key):

* ``sdpa`` (the CPU platform, the reference): ``scaled_dot_product_attention`` with the dense
  boolean mask. Dense masks are ``[s/cp, s]``: fine for the CPU's small contexts.
* ``flex`` (CUDA without TE): ``flex_attention`` (compiled) with a block-sparse ``BlockMask``
  built from per-block segment and position ranges, so no ``s x s`` mask is ever built and
  blocks no query attends are skipped. Never run on a GPU in this repository's CI (no GPU);
  on the CPU its forward is tested against ``sdpa`` (FlexAttention has no CPU backward).

Grouped-query attention, causal or bidirectional; for packed input no token attends across a
sample (or image) boundary. No parameters, like TE's core attention, so checkpoints are
unaffected.

Context parallel (``config.context_parallel_size > 1``): query, key and value hold this CP
rank's load-balanced shard of the sequence (``omni_train.platform.kernels.cp_layout``). Keys
and values are all-gathered over the CP group (megatron's ``all_gather`` CP communication; the
backward reduce-scatters their gradients back to their owners), and the mask is built from the
tokens' global positions: causal order and, for packed input, the sample boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from omni_train.platform.kernels.cp_layout import gathered_positions

FLEX_BLOCK = 128  # FlexAttention's default tile: the BlockMask granularity


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[total]`` int64: the segment index of every token; tokens past ``cu_seqlens[-1]``
    (padding of the packed buffer) form one extra segment of their own."""
    bounds = cu_seqlens.to(torch.int64)
    lengths = torch.diff(bounds, append=bounds.new_tensor([total]))
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=bounds.device), lengths)


@dataclass(frozen=True)
class DocumentMask:
    """Query ``i`` attends key ``j`` iff ``seg_q[i] == seg_k[j]`` and, when causal,
    ``pos_k[j] <= pos_q[i]``. All ``[sq]`` / ``[sk]`` int64 on the tensors' device."""

    seg_q: torch.Tensor
    seg_k: torch.Tensor
    pos_q: torch.Tensor
    pos_k: torch.Tensor
    causal: bool

    @classmethod
    def build(
        cls, sq: int, cu: torch.Tensor | None, causal: bool, device, cp: int = 1, cp_rank: int = 0
    ) -> DocumentMask:
        """Packed (``cu`` given) and/or context-parallel input of ``sq`` local queries; the keys
        are the whole (gathered) sequence of ``sq * cp`` tokens."""
        total = sq * cp
        if cp > 1:
            pos_k = gathered_positions(total, cp, cu).to(device)
            pos_q = pos_k.view(cp, -1)[cp_rank]  # this rank's shard, in order
        else:
            pos_k = pos_q = torch.arange(total, device=device)
        if cu is None:
            seg_k = torch.zeros(total, dtype=torch.int64, device=device)
        else:
            seg_k = segment_ids(cu.to(device), total)[pos_k]
        seg_q = seg_k.view(cp, -1)[cp_rank] if cp > 1 else seg_k
        return cls(seg_q, seg_k, pos_q, pos_k, causal)

    def dense(self) -> torch.Tensor:
        """``[sq, sk]`` bool, True = attend."""
        mask = self.seg_q[:, None] == self.seg_k[None, :]
        if self.causal:
            mask &= self.pos_k[None, :] <= self.pos_q[:, None]
        return mask

    def mask_mod(self):
        """FlexAttention's per-element rule (the same as :meth:`dense`), as a closure over this
        mask's tensors: the form torch.compile's FlexAttention examples use."""
        seg_q, seg_k, pos_q, pos_k, causal = (
            self.seg_q, self.seg_k, self.pos_q, self.pos_k, self.causal
        )  # fmt: skip

        def document(b, h, q_idx, kv_idx):
            keep = seg_q[q_idx] == seg_k[kv_idx]
            if causal:
                keep = keep & (pos_k[kv_idx] <= pos_q[q_idx])
            return keep

        return document

    def block_mask(self, block: int = FLEX_BLOCK):
        """A FlexAttention ``BlockMask`` from per-block ranges, ``[ceil(sq/B), ceil(sk/B)]``.

        A block pair is skipped when the blocks' segment ranges do not meet (or, causal, every
        key comes after every query), and is *full* (no per-element mask) when both blocks are
        complete, hold one and the same segment and, causal, every key precedes every query.
        Ranges over-approximate a block whose tokens are not contiguous (context-parallel
        shards): such pairs become partial, never wrongly skipped or full.
        """
        from torch.nn.attention.flex_attention import BlockMask

        q = _block_ranges(self.seg_q, self.pos_q, block)
        k = _block_ranges(self.seg_k, self.pos_k, block)
        meet = (q.seg_lo[:, None] <= k.seg_hi[None, :]) & (k.seg_lo[None, :] <= q.seg_hi[:, None])
        full = (q.one_seg[:, None] & k.one_seg[None, :]) & (q.seg_lo[:, None] == k.seg_lo[None, :])
        if self.causal:
            meet &= k.pos_lo[None, :] <= q.pos_hi[:, None]
            full &= k.pos_hi[None, :] <= q.pos_lo[:, None]
        full &= meet
        partial = meet & ~full

        def indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            num = keep.sum(-1, dtype=torch.int32)[None, None]
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
            return num, order.to(torch.int32)[None, None]

        kv_num, kv_idx = indices(partial)
        full_num, full_idx = indices(full)
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=block,
            mask_mod=self.mask_mod(),
            seq_lengths=(self.seg_q.numel(), self.seg_k.numel()),
        )


@dataclass(frozen=True)
class _Ranges:
    seg_lo: torch.Tensor  # [blocks]
    seg_hi: torch.Tensor
    pos_lo: torch.Tensor
    pos_hi: torch.Tensor
    one_seg: torch.Tensor  # bool: a complete block of one segment


def _block_ranges(seg: torch.Tensor, pos: torch.Tensor, block: int) -> _Ranges:
    n = seg.numel()
    blocks = math.ceil(n / block)
    pad = blocks * block - n

    def lo_hi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The padding of the last block repeats its last value: neutral for min and max.
        full = torch.cat([x, x[-1:].expand(pad)]).view(blocks, block)
        return full.amin(-1), full.amax(-1)

    seg_lo, seg_hi = lo_hi(seg)
    pos_lo, pos_hi = lo_hi(pos)
    complete = torch.ones(blocks, dtype=torch.bool, device=seg.device)
    if pad:
        complete[-1] = False
    return _Ranges(seg_lo, seg_hi, pos_lo, pos_hi, complete & (seg_lo == seg_hi))


@cache
def _compiled_flex():
    """``flex_attention`` compiled once per process (eager FlexAttention materialises the
    scores; only the compiled kernel is block-sparse)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention(q, k, v, mask: DocumentMask, scale: float | None) -> torch.Tensor:
    """``[b, n, s, d]`` inputs, ``[b, n, sq, d]`` output; compiled on CUDA, eager elsewhere."""
    from torch.nn.attention.flex_attention import flex_attention as eager

    kernel = _compiled_flex() if q.is_cuda else eager
    return kernel(
        q, k, v, block_mask=mask.block_mask(), scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


class TorchDotProductAttention(MegatronModule):
    """Drop-in for ``TEDotProductAttention`` (same constructor and forward contract), SDPA
    backend (see the module docstring).

    Unpacked input: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``; output
    ``[sq, b, np*hn]``. Packed (``packed_seq_params.qkv_format == "thd"``): query ``[t, np, hn]``,
    key/value ``[t, ng, hn]`` with ``cu_seqlens`` ``[num_seqs + 1]``; output ``[t, np*hn]``.
    ``np``/``ng`` are the heads/groups local to this tensor-parallel rank.
    """

    backend = "sdpa"

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
            raise NotImplementedError("attention_bias: not supported by the PyTorch attention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed:  # [t, n, d] -> [1, n, t, d]
            q, k, v = (x.unsqueeze(0).transpose(1, 2) for x in (query, key, value))
        else:  # [s, b, n, d] -> [b, n, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        cu = None
        if packed:
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
        dense = None
        doc = None
        if self.cp > 1:
            if attention_mask is not None and not packed:
                raise NotImplementedError("an explicit attention mask under context parallel")
            k, v = (self._gather_kv(x) for x in (k, v))
            doc = DocumentMask.build(
                q.shape[2], cu, causal, q.device, self.cp, self.cp_group.rank()
            )
        elif packed:
            doc = DocumentMask.build(q.shape[2], cu, causal, q.device)
        elif attention_mask is not None:
            dense = ~attention_mask.bool()  # megatron: True = masked out
            if causal:
                dense = dense & torch.ones_like(dense).tril()
        dropout = self.dropout_p if self.training else 0.0
        if doc is not None and self.backend == "flex":
            if dropout:
                raise NotImplementedError("attention dropout with the flex backend")
            out = flex_attention(q, k, v, doc, self.softmax_scale)
        else:
            if doc is not None:
                dense = doc.dense()
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=dense,
                dropout_p=dropout,
                is_causal=causal and dense is None,
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


class FlexDotProductAttention(TorchDotProductAttention):
    """The same module with the FlexAttention backend for packed / context-parallel input
    (CUDA without Transformer Engine)."""

    backend = "flex"
