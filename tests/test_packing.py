"""Sequence packing algorithm (omni_train.data.packing): capacity, exactly-once placement,
determinism, best fit, and data-parallel balance."""

from __future__ import annotations

import random

import pytest

from omni_train.data.packing import balance, imbalance, pack, sample_cost


def random_lengths(n: int, capacity: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(capacity, max(1, int(rng.lognormvariate(7.0, 1.0)))) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_bins_respect_capacity_and_place_every_sample_once(seed):
    capacity = 16384
    lengths = random_lengths(1000, capacity, seed)
    bins = pack(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in b) for b in bins]
    assert max(fills) <= capacity
    assert fills == sorted(fills, reverse=True)  # fullest first
    # greedy knapsack leaves at most one bin that another bin's smallest sample could join
    assert sum(fills) / (len(bins) * capacity) > 0.97
    assert pack(lengths, capacity) == bins  # deterministic


def test_best_fit_picks_the_fullest_bin_with_room():
    # 6 and 5 open two bins (free 4 and 5); 4 goes to the fuller one (free 4), 3 then opens
    # nothing new: it fits the bin with 5 free
    assert pack([6, 5, 4, 3], 10) == [[0, 2], [1, 3]]
    assert pack([10, 10, 1], 10) == [[0], [1], [2]]


def test_unpackable_lengths_are_refused():
    with pytest.raises(ValueError, match=r"sample 1 has 20 tokens; packable lengths are 1..16"):
        pack([3, 20], 16)
    with pytest.raises(ValueError, match="sample 0 has 0 tokens"):
        pack([0], 16)


def test_balance_deals_equal_counts_and_evens_cost():
    capacity = 16384
    lengths = random_lengths(4000, capacity, 0)
    bins = pack(lengths, capacity)[:64]
    costs = [sum(sample_cost(lengths[i], 1) for i in b) for b in bins]
    ranks = balance(costs, 8)
    assert sorted(b for r in ranks for b in r) == list(range(64))
    assert all(len(r) == 8 for r in ranks)
    round_robin = [list(range(r, 64, 8)) for r in range(8)]
    assert imbalance(costs, ranks) <= 1.02
    assert imbalance(costs, ranks) <= imbalance(costs, round_robin)
    with pytest.raises(ValueError, match="cannot be dealt evenly to 7 ranks"):
        balance(costs, 7)


def test_attention_makes_one_long_sample_cost_more_than_many_short():
    assert sample_cost(16384) == pytest.approx(2 * 16384)
    assert sample_cost(16384) > 16 * sample_cost(1024)
    assert sample_cost(100, 2) == pytest.approx(100 + 100 * 100 / 16384 + 512)
