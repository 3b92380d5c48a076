"""Context-parallel token layout: megatron-core's load-balanced split, unpacked and packed."""

from __future__ import annotations

import pytest
import torch

from omni_train.platform.kernels.cp_layout import (
    gathered_positions,
    partitioned_indices,
    thd_partitioned_indices,
)


def test_unpacked_split_is_megatrons_load_balanced_layout():
    # 16 tokens, cp=2: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert partitioned_indices(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert partitioned_indices(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("cp", [2, 4])
def test_packed_split_cuts_every_sample_into_2cp_chunks(cp):
    lengths = [8 * cp, 2 * cp, 4 * cp]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    shards = [thd_partitioned_indices(cu, total, cp, r) for r in range(cp)]
    for r, shard in enumerate(shards):
        assert shard.dtype == torch.int32 and shard.numel() == total // cp
        expected = []
        for start, n in zip(cu[:-1].tolist(), lengths, strict=True):
            c = n // (2 * cp)
            expected += list(range(start + r * c, start + (r + 1) * c))
            expected += list(range(start + (2 * cp - 1 - r) * c, start + (2 * cp - r) * c))
        assert shard.tolist() == expected
    # every token on exactly one rank; the all-gather order is the ranks' shards in turn
    assert sorted(torch.cat(shards).tolist()) == list(range(total))
    assert gathered_positions(total, cp, cu).tolist() == torch.cat(shards).tolist()


def test_packed_split_rejects_incompatible_padding():
    cu = torch.tensor([0, 6, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="not divisible by 2 x cp = 4"):
        thd_partitioned_indices(cu, 12, 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens ends at 12"):
        thd_partitioned_indices(cu, 16, 2, 0)
    with pytest.raises(ValueError, match="not divisible by 2 x cp = 4"):
        partitioned_indices(18, 2, 0)
