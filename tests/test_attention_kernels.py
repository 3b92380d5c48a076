"""The PyTorch attention backends: FlexAttention's block-sparse document mask against the dense
reference mask, and flex against SDPA (forward: FlexAttention has no CPU backward)."""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from omni_train.platform.kernels.attention import DocumentMask, flex_attention
from omni_train.platform.kernels.cp_layout import thd_partitioned_indices


@pytest.fixture(autouse=True)
def _dynamo_on(monkeypatch):
    """FlexAttention is compiled. The CPU platform's ``setup()`` switches dynamo off for the
    whole process (``platform.device.eager_fusions``), and tests in this worker may have run it
    in-process before: these tests must not depend on the order the suite ran in."""
    monkeypatch.setattr(torch._dynamo.config, "disable", False)


# Sample lengths of one packed buffer (the last 7 tokens are the buffer's padding).
_LENGTHS = [1, 130, 127, 256, 3, 200, 96, 420]
_TOTAL = sum(_LENGTHS) + 7


def _cu(lengths=_LENGTHS) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _dense_from_blocks(mask: DocumentMask, block: int) -> torch.Tensor:
    """Expand the BlockMask to ``[sq, sk]``: full blocks all True, partial blocks through the
    mask_mod, skipped blocks all False."""
    bm = mask.block_mask(block)
    sq, sk = mask.seg_q.numel(), mask.seg_k.numel()
    out = torch.zeros(sq, sk, dtype=torch.bool)
    q_idx = torch.arange(sq)[:, None]
    for kind, num, idx in (
        ("partial", bm.kv_num_blocks, bm.kv_indices),
        ("full", bm.full_kv_num_blocks, bm.full_kv_indices),
    ):
        for qb in range(num.shape[-1]):
            for kb in idx[0, 0, qb, : num[0, 0, qb]].tolist():
                rows = slice(qb * block, min((qb + 1) * block, sq))
                cols = slice(kb * block, min((kb + 1) * block, sk))
                kv_idx = torch.arange(sk)[None, cols]
                if kind == "full":
                    assert mask.dense()[rows, cols].all(), (qb, kb)  # "full" must be exact
                    out[rows, cols] = True
                else:
                    out[rows, cols] = mask.mask_mod()(None, None, q_idx[rows], kv_idx)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [128, 64])
def test_block_mask_is_exactly_the_document_mask(causal, block):
    mask = DocumentMask.build(_TOTAL, _cu(), causal, "cpu")
    assert torch.equal(_dense_from_blocks(mask, block), mask.dense())
    bm = mask.block_mask(block)
    nq = -(-_TOTAL // block)
    total_pairs = (bm.kv_num_blocks + bm.full_kv_num_blocks).sum().item()
    assert total_pairs < nq * nq  # block-sparse: pairs across documents are skipped
    assert bm.full_kv_num_blocks.sum() > 0


@pytest.mark.parametrize("cp", [2, 4])
def test_block_mask_under_context_parallel_shards(cp):
    """The load-balanced CP shard (two chunks per sample per rank): non-contiguous blocks
    become partial, never wrongly skipped or full."""
    lengths = [cp * 2 * n for n in (40, 96, 8, 64)]
    total = sum(lengths)
    for rank in range(cp):
        for causal in (True, False):
            mask = DocumentMask.build(total // cp, _cu(lengths), causal, "cpu", cp, rank)
            assert torch.equal(_dense_from_blocks(mask, 32), mask.dense())
            # The shard's queries are the tokens megatron/TE hand this rank.
            idx = thd_partitioned_indices(_cu(lengths), total, cp, rank).long()
            assert torch.equal(mask.pos_q, idx)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_equals_sdpa_on_packed_input(causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, _TOTAL, 16, generator=g)
    k, v = (torch.randn(1, 2, _TOTAL, 16, generator=g) for _ in range(2))  # GQA: 2 groups
    mask = DocumentMask.build(_TOTAL, _cu(), causal, "cpu")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(), enable_gqa=True)
    out = flex_attention(q, k, v, mask, scale=None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flex_module_equals_the_sdpa_module_on_packed_thd_input():
    """megatron's core-attention contract (THD ``[t, heads, dim]`` in, ``[t, heads*dim]`` out)
    through both modules, causal (LM) and bidirectional (ViT)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from omni_train.platform.kernels.attention import (
        FlexDotProductAttention,
        TorchDotProductAttention,
    )

    config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, attention_dropout=0.0
    )
    g = torch.Generator().manual_seed(1)
    q = torch.randn(_TOTAL, 4, 16, generator=g)
    k, v = (torch.randn(_TOTAL, 2, 16, generator=g) for _ in range(2))
    cu = _cu()
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    for mask in (AttnMaskType.causal, AttnMaskType.no_mask):
        ref = TorchDotProductAttention(config, 1, mask, "self")(
            q, k, v, None, packed_seq_params=params
        )
        with torch.no_grad():  # FlexAttention has no CPU backward
            out = FlexDotProductAttention(config, 1, mask, "self")(
                q, k, v, None, packed_seq_params=params
            )
        assert out.shape == (_TOTAL, 64)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
