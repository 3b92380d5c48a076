"""Balanced greedy-knapsack sequence packing: the algorithm (pure Python).

Work in progress for issue #5: the online buffer over the energon stream, the THD micro-batches
and the benchmark build on these two functions.

- :func:`pack`: lengths -> bins (lists of sample indices) of at most ``capacity`` tokens.
  Greedy knapsack: samples largest first, each into the bin it fits *best* (the fullest bin
  that still has room), a new bin when none has room. Ties break by index, so the result is
  deterministic.
- :func:`balance`: bins -> data-parallel ranks, the same number of bins per rank, so that the
  largest per-rank compute cost is as small as greedy can make it (costliest bin first, to the
  cheapest rank that still needs bins).

Cost model (:func:`sample_cost`): per sample, linear token work plus the attention term,
which is quadratic in the *sample's* length (packed attention never crosses sample
boundaries), plus encoder work per media item. The weights are relative; they only decide how
bins are dealt out.

Why not a library: megatron-core and energon offer packing *hooks* (energon's
``select_samples_to_pack`` / ``pack_selected_samples``), not a balanced bin packer; this
module is what those hooks call.
"""

from __future__ import annotations

from collections.abc import Sequence

from sortedcontainers import SortedList


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to at most ``capacity`` tokens.

    ``lengths[i]`` is sample ``i``'s token count; every length must be in ``[1, capacity]``
    (skip or truncate longer samples before packing). Bins come out fullest first; within a
    bin, indices keep the order samples were placed (largest first).
    """
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"sample {i} has {n} tokens; packable lengths are 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room = SortedList()  # (free tokens, bin id): best fit = smallest free >= length
    for i in order:
        n = lengths[i]
        at = room.bisect_left((n, -1))
        if at == len(room):
            bins.append([i])
            free, b = capacity - n, len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= n
        if free:
            room.add((free, b))
    fill = [sum(lengths[i] for i in b) for b in bins]
    return [bins[b] for b in sorted(range(len(bins)), key=lambda b: (-fill[b], b))]


def sample_cost(
    num_tokens: int,
    num_media: int = 0,
    *,
    attention_weight: float = 1.0 / 16384,
    media_weight: float = 256.0,
) -> float:
    """Relative compute of one sample: ``tokens + tokens^2 x attention_weight + media x
    media_weight``. With the defaults, a 16k-token sample's attention costs as much again as
    its linear work, and a media item as much as 256 tokens of LM work."""
    return num_tokens + num_tokens * num_tokens * attention_weight + num_media * media_weight


def balance(costs: Sequence[float], num_ranks: int) -> list[list[int]]:
    """Deal bins (their ``costs``) to ``num_ranks`` ranks, ``len(costs) / num_ranks`` each.

    Greedy longest-processing-time first: the costliest bin goes to the rank with the least
    cost so far among ranks that still need bins. Returns bin indices per rank.
    """
    if num_ranks < 1 or len(costs) % num_ranks:
        raise ValueError(f"{len(costs)} bins cannot be dealt evenly to {num_ranks} ranks")
    per_rank = len(costs) // num_ranks
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    load = [0.0] * num_ranks
    for b in sorted(range(len(costs)), key=lambda b: (-costs[b], b)):
        r = min((r for r in range(num_ranks) if len(ranks[r]) < per_rank), key=lambda r: load[r])
        ranks[r].append(b)
        load[r] += costs[b]
    return ranks


def imbalance(costs: Sequence[float], ranks: list[list[int]]) -> float:
    """max / mean of the per-rank cost (1.0 is perfect balance)."""
    loads = [sum(costs[b] for b in r) for r in ranks]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0
