"""Online balanced greedy-knapsack sequence packing: the algorithm (pure Python, no torch).

- :func:`pack`: lengths -> bins (lists of sample indices) of at most ``capacity`` tokens.
  Greedy knapsack: samples largest first, each into the bin it fits *best* (the fullest bin
  that still has room), a new bin when none has room. Ties break by index, so the result is
  deterministic.
- :func:`balance`: bins -> data-parallel ranks, the same number of bins per rank, so that the
  largest per-rank compute cost is as small as greedy can make it (costliest bin first, to the
  cheapest rank that still needs bins). Used for a whole buffer dealt at once (benchmarks).
- :class:`OnlinePacker`: the packer the data pipeline runs over a stream. It holds a bounded
  buffer of samples (lengths and costs only; the samples themselves stay undecoded next to
  it), packs the buffer with :func:`pack`, and emits *rounds*: one bin per data-parallel rank,
  chosen among the full-enough bins so that the bins of a round cost about the same. Bins that
  are not full enough wait, and their samples are repacked with newly read ones (carry-over),
  so the emitted bins stay full; a sample waits at most ``max_wait`` repacks. Its state is
  plain data (:attr:`OnlinePacker.state`) so the data loader can checkpoint it.

Cost model (:func:`sample_cost`, weights :class:`CostWeights`): per sample, linear token work,
plus the attention term (quadratic in the *sample's* length: packed attention never crosses
sample boundaries), plus encoder work per media token. Only relative values matter; they decide
which bins share a round.

Why by hand: megatron-core and energon offer packing *hooks* (energon's
``select_samples_to_pack`` / ``pack_selected_samples`` over a buffer that is emptied and
dropped on every call), not a balanced bin packer with carry-over; this module is that packer
and :mod:`omni_train.data.packed` runs it inside energon.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

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


@dataclass(frozen=True)
class CostWeights:
    """Relative compute per unit, one LM token's forward+backward = 1.

    Defaults are derived for the production model (docs/packing.md shows the arithmetic):

    - ``attention``: per (sample tokens)^2. 6 attention layers x 32 heads x 128 dims, causal:
      ``6 x 2 x 4096 / 2 FLOPs x n^2`` against ``2 x 3.2e9`` (active parameters) ``x n``.
      At 16k tokens the attention adds 13 % to a sample's linear work, at 256k 2x.
    - ``vision``: per image/video token: the RADIO ViT-H (0.63B parameters) over the 4 patches
      a token pools, plus the projector, against an LM token's 3.2B.
    - ``audio``: per audio token: the FastConformer (0.6B) over one 80 ms frame, plus projector.
    """

    attention: float = 7.7e-6
    vision: float = 0.83
    audio: float = 0.19


def sample_cost(
    num_tokens: int,
    vision_tokens: int = 0,
    audio_tokens: int = 0,
    weights: CostWeights = CostWeights(),  # noqa: B008 (frozen, shared)
) -> float:
    """Relative compute of one sample: ``tokens + tokens^2 x attention + vision_tokens x
    vision + audio_tokens x audio``."""
    return (
        num_tokens
        + num_tokens * num_tokens * weights.attention
        + vision_tokens * weights.vision
        + audio_tokens * weights.audio
    )


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


# -- online --------------------------------------------------------------------------------

# A fresh repack is due when fewer than this many rounds of full-enough bins remain: the last
# rounds before a repack choose among few bins, and balance suffers.
_REPACK_BELOW_ROUNDS = 2


class PackerState(TypedDict):
    """Everything an :class:`OnlinePacker` changes, as plain data (the data loader checkpoints
    it)."""

    items: dict[int, list]  # id -> [length, cost, repack count at arrival]
    next_id: int
    bins: list[list[int]]  # ids per bin, from the last repack, minus emitted bins
    stats: list[list]  # per bin: [tokens, cost, oldest arrival]
    num_repacks: int
    num_rounds: int
    fresh: bool  # no round emitted since the last repack


class OnlinePacker:
    """Bins over a bounded, carried-over buffer; one bin per rank per round.

    Use: whenever :meth:`needs_samples`, :meth:`add` samples until the buffer holds
    ``buffer_size`` (or the stream ends) and :meth:`repack`; then :meth:`next_round`. At least
    one round follows every repack, so the loop always makes progress. ``add`` returns the
    sample's id; ``next_round`` returns, per rank, the ids in that rank's bin (``[]``: an empty
    bin, only when the buffer holds fewer bins than ranks) and forgets them. Every sample added
    is emitted exactly once.

    Round choice: candidate bins are those at least ``min_fill`` full, and any bin holding a
    sample that has waited ``max_wait`` repacks (it must go out now). Sorted by cost, the round
    is the window of ``num_ranks`` consecutive candidates with the smallest max/min cost ratio
    (it must contain the bin of the longest-waiting sample, when one is overdue); the window is
    dealt to ranks rotated by the round number, so no rank always gets the costliest bin.
    """

    def __init__(
        self,
        capacity: int,
        num_ranks: int = 1,
        *,
        min_fill: float = 0.95,
        max_wait: int = 4,
        state: PackerState | None = None,
    ):
        if capacity < 1 or num_ranks < 1 or max_wait < 1 or not 0.0 < min_fill <= 1.0:
            raise ValueError(
                f"OnlinePacker(capacity={capacity}, num_ranks={num_ranks}, min_fill={min_fill},"
                f" max_wait={max_wait}): need capacity, num_ranks, max_wait >= 1, 0 < min_fill <= 1"
            )
        self.capacity, self.num_ranks = capacity, num_ranks
        self.min_fill, self.max_wait = min_fill, max_wait
        # Everything that changes, as plain data (checkpointed by the data loader).
        self.state = state if state is not None else self.initial_state()

    @staticmethod
    def initial_state() -> PackerState:
        return PackerState(
            items={}, next_id=0, bins=[], stats=[], num_repacks=0, num_rounds=0, fresh=False
        )

    def __len__(self) -> int:
        return len(self.state["items"])

    def add(self, length: int, cost: float) -> int:
        if not 0 < length <= self.capacity:
            raise ValueError(f"a sample of {length} tokens cannot be packed into {self.capacity}")
        st = self.state
        sid = st["next_id"]
        st["items"][sid] = [int(length), float(cost), st["num_repacks"]]
        st["next_id"] += 1
        return sid

    def repack(self) -> None:
        st = self.state
        ids = list(st["items"])  # arrival order
        items = st["items"]
        bins = pack([items[i][0] for i in ids], self.capacity)
        st["bins"] = [[ids[j] for j in b] for b in bins]
        st["stats"] = [
            [
                sum(items[i][0] for i in b),
                sum(items[i][1] for i in b),
                min(items[i][2] for i in b),
            ]
            for b in st["bins"]
        ]
        st["num_repacks"] += 1
        st["fresh"] = True

    def _overdue(self, k: int) -> bool:
        st = self.state
        return st["num_repacks"] - st["stats"][k][2] >= self.max_wait

    def _candidates(self) -> list[int]:
        floor = self.min_fill * self.capacity
        stats = self.state["stats"]
        return [k for k in range(len(stats)) if stats[k][0] >= floor or self._overdue(k)]

    def needs_samples(self) -> bool:
        """True when the caller should add samples (up to its buffer size, or none if the
        stream ended) and :meth:`repack` before the next round: no bins are left, or (some
        round was emitted since the last repack) fewer full-enough bins than two rounds."""
        st = self.state
        if not st["bins"]:
            return True
        return not st["fresh"] and len(self._candidates()) < _REPACK_BELOW_ROUNDS * self.num_ranks

    def next_round(self) -> list[list[int]]:
        """Per rank, the sample ids of its bin (largest sample first)."""
        st = self.state
        if not st["bins"]:
            raise RuntimeError("next_round on an empty packer: add samples and repack first")
        stats = st["stats"]
        window = sorted(self._choose(), key=lambda k: (stats[k][1], k))
        rot = st["num_rounds"] % self.num_ranks
        out: list[list[int]] = []
        for r in range(self.num_ranks):
            j = (r + rot) % self.num_ranks
            out.append(list(st["bins"][window[j]]) if j < len(window) else [])
        for sid in (i for b in out for i in b):
            del st["items"][sid]
        gone = set(window)
        st["bins"] = [b for k, b in enumerate(st["bins"]) if k not in gone]
        st["stats"] = [x for k, x in enumerate(stats) if k not in gone]
        st["num_rounds"] += 1
        st["fresh"] = False
        return out

    def _choose(self) -> list[int]:
        """Bin indices of the next round (``num_ranks`` of them, fewer only if fewer exist)."""
        d, stats = self.num_ranks, self.state["stats"]
        cands = self._candidates()
        if len(cands) < d:  # a fresh repack with too few full bins: take the fullest ones
            taken = set(cands)
            rest = sorted(
                (k for k in range(len(stats)) if k not in taken), key=lambda k: (-stats[k][0], k)
            )
            cands += rest[: d - len(cands)]
        order = sorted(cands, key=lambda k: (stats[k][1], k))
        if len(order) <= d:
            return order
        overdue = [k for k in order if self._overdue(k)]
        anchor = min(overdue, key=lambda k: (stats[k][2], k)) if overdue else None
        best, best_key = order[:d], None
        for start in range(len(order) - d + 1):
            window = order[start : start + d]
            if anchor is not None and anchor not in window:
                continue
            lo, hi = stats[window[0]][1], stats[window[-1]][1]
            key = (hi / lo if lo > 0 else float("inf"), -sum(stats[k][0] for k in window), start)
            if best_key is None or key < best_key:
                best, best_key = window, key
        return best
