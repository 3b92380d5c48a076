"""Sequence packing algorithm (omni_train.data.packing): capacity, exactly-once placement,
determinism, best fit, and data-parallel balance."""

from __future__ import annotations

import copy
import random

import pytest

from omni_train.data.packing import (
    CostWeights,
    OnlinePacker,
    balance,
    imbalance,
    pack,
    sample_cost,
)


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
    w = CostWeights()
    assert sample_cost(16384) == pytest.approx(16384 * (1 + 16384 * w.attention))
    assert sample_cost(16384) > 16 * sample_cost(1024)
    # 13 % more at 16k (the production model: 6 attention layers in 52), 2x at 256k
    assert 1.12 < sample_cost(16384) / 16384 < 1.14 and 2.9 < sample_cost(2**18) / 2**18 < 3.1
    assert sample_cost(100, 40, 10) == pytest.approx(100 + 1e4 * w.attention + 40 * 0.83 + 1.9)


# -- the online packer ----------------------------------------------------------------------


def drive(packer: OnlinePacker, samples, buffer_size: int, num_rounds: int, meta=None):
    """Run the data pipeline's loop: refill + repack when asked, then one round. Returns the
    rounds (per rank: [(sample, length, cost)]) and the repacks each emitted sample waited.
    ``meta``: packer id -> (sample, repacks at arrival), kept across calls by the caller."""
    rounds, waited = [], []
    meta = {} if meta is None else meta
    for _ in range(num_rounds):
        if packer.needs_samples():
            while len(packer) < buffer_size:
                sample = next(samples, None)
                if sample is None:
                    break
                sid = packer.add(sample[1], sample[2])
                meta[sid] = (sample, packer.state["num_repacks"])
            if not len(packer):
                break
            packer.repack()
        rnd = []
        for ids in packer.next_round():
            rnd.append([meta[i][0] for i in ids])
            waited += [packer.state["num_repacks"] - meta.pop(i)[1] for i in ids]
        rounds.append(rnd)
    return rounds, waited


def mixture(n: int, capacity: int, seed: int):
    """Stage-4-like: lognormal lengths around 2k, half the samples with vision tokens."""
    rng = random.Random(seed)
    for k in range(n):
        length = min(capacity, max(16, int(rng.lognormvariate(7.4, 0.9))))
        vision = int(length * 0.7) if rng.random() < 0.5 else 0
        yield k, length, sample_cost(length, vision)


def test_online_packer_places_every_sample_once_within_capacity_deterministically():
    capacity = 16384
    runs = [
        drive(OnlinePacker(capacity, 4), mixture(3000, capacity, 0), 500, 10_000)[0]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]  # deterministic
    rounds = runs[0]
    placed = [s[0] for rnd in rounds for b in rnd for s in b]
    assert sorted(placed) == list(range(3000))  # the stream ran dry: all drained, once each
    assert all(len(rnd) == 4 for rnd in rounds)
    assert max(sum(s[1] for s in b) for rnd in rounds for b in rnd) <= capacity


def test_online_packer_meets_the_efficiency_and_balance_targets():
    """16k, 1,000-sample buffer, 8 ranks: >= 98 % full, round cost max/mean <= 1.02 on
    average (issue #5's targets); dealing the same bins blind to cost is clearly worse."""
    capacity, d = 16384, 8
    rounds, waited = drive(OnlinePacker(capacity, d), mixture(20_000, capacity, 1), 1000, 1500)
    rounds = rounds[:1500]
    fill = [sum(s[1] for s in b) for rnd in rounds[:-20] for b in rnd]  # not the final drain
    assert sum(fill) / (len(fill) * capacity) >= 0.98
    ratio = lambda c: max(c) / (sum(c) / len(c))  # noqa: E731
    ours = [ratio([sum(s[2] for s in b) for b in rnd]) for rnd in rounds[:-20]]
    assert sum(ours) / len(ours) <= 1.02
    bins = [b for rnd in rounds[:-20] for b in rnd]  # the same bins, dealt blind to cost
    random.Random(0).shuffle(bins)
    naive = [ratio([sum(s[2] for s in b) for b in bins[k : k + d]]) for k in range(0, len(bins), d)]
    assert sum(naive) / len(naive) > sum(ours) / len(ours) + 0.01
    assert max(waited) <= 2 * 4  # no sample starves: a few repacks past max_wait at most


def test_online_packer_state_resumes_mid_buffer_identically():
    capacity = 16384
    first, meta = OnlinePacker(capacity, 2), {}
    samples = mixture(2000, capacity, 2)
    drive(first, samples, 300, 40, meta)
    # what a checkpoint holds: the packer's plain-data state (+ the loader's sample keys)
    saved, saved_meta = copy.deepcopy(first.state), dict(meta)
    assert len(first) > 0  # saved in the middle of a buffer
    rest = list(samples)
    tail, _ = drive(first, iter(rest), 300, 10_000, meta)
    resumed = OnlinePacker(capacity, 2, state=saved)
    again, _ = drive(resumed, iter(rest), 300, 10_000, saved_meta)
    assert again == tail and len(tail) > 100


def test_online_packer_progresses_when_no_bin_can_be_full():
    """Every sample 60 % of capacity: no bin reaches min_fill, rounds still go out."""
    capacity = 1000
    samples = iter([(k, 600, 600.0) for k in range(50)])
    rounds, _ = drive(OnlinePacker(capacity, 2), samples, 10, 1000)
    assert sorted(s[0] for rnd in rounds for b in rnd for s in b) == list(range(50))


def test_online_packer_refuses_bad_arguments():
    with pytest.raises(ValueError, match="cannot be packed into 100"):
        OnlinePacker(100).add(101, 1.0)
    with pytest.raises(ValueError, match="min_fill"):
        OnlinePacker(100, min_fill=0.0)


# -- packed (THD) micro-batches ----------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded():
    """A task encoder for the tiny omni model and 5 decoded synthetic samples with media."""
    import json

    from omni_train.config import compose_job
    from omni_train.data.loader import task_encoder
    from omni_train.data.task_encoder import cook_raw
    from omni_train.datatools.synth_media import synth_samples

    cfg = compose_job(["stage=smoke_omni", "model=tiny"])
    te = task_encoder(cfg, training=True)
    raw = synth_samples("image", 2, 0) + synth_samples("audio_video", 2, 0)
    raw += synth_samples("text", 1, 0)
    samples = [
        te.encode(cook_raw(s.key, {"json": json.dumps(s.conversation).encode(), **s.members}))
        for s in raw
    ]
    return te, samples


def test_packed_sequence_layout_with_sp_and_cp_padding(encoded):
    """Per-sample padding to 2 x cp x tp (context parallel), the whole to tp (sequence
    parallel): boundaries, tokens, labels, loss mask, restarting positions, media owners."""
    import torch

    from omni_train.data.loader import packed_seq_params
    from omni_train.model.omni import sample_index

    te, samples = encoded
    te.sample_pad_multiple, te.pad_multiple = 8, 2  # cp=2, tp=2 with sp
    p = te.pack_selected_samples(samples)
    lengths = [s.tokens.shape[0] for s in samples]
    padded = [-(-n // 8) * 8 for n in lengths]
    assert p.cu_seqlens.tolist() == [0] + [sum(padded[:k]) + lengths[k] for k in range(5)]
    assert p.cu_seqlens_padded.tolist() == [sum(padded[:k]) for k in range(6)]
    assert p.tokens.shape[0] == sum(padded) and p.tokens.shape[0] % 8 == 0
    assert p.num_real_tokens == sum(lengths)
    for k, (s, start) in enumerate(zip(samples, p.cu_seqlens_padded.tolist(), strict=False)):
        n, end = lengths[k], p.cu_seqlens_padded[k + 1]
        assert torch.equal(p.tokens[start : start + n], s.tokens)
        assert torch.equal(p.labels[start : start + n], s.labels)
        assert torch.equal(p.loss_mask[start : start + n], s.loss_mask)
        assert (p.tokens[start + n : end] == te.pad_id).all() and p.loss_mask[
            start + n : end
        ].sum() == 0
        assert p.position_ids[start] == 0 and p.position_ids[start + n - 1] == n - 1
    assert p.loss_mask.sum() == sum(s.loss_mask.sum() for s in samples)
    for kind, owners in (
        ("images", p.media.image_sample),
        ("videos", p.media.video_sample),
        ("audio", p.media.audio_sample),
    ):
        want = [k for k, smp in enumerate(samples) for _ in getattr(smp, kind)]
        assert owners == want and len(getattr(p.media, kind)) == len(want)
    assert p.media.image_sample and p.media.video_sample and p.media.audio_sample
    # the model's view: every token's segment, from megatron's PackedSeqParams
    params = packed_seq_params(p.cu_seqlens, p.cu_seqlens_padded)
    seg = sample_index(p.tokens[None], params)[0]
    assert seg.tolist() == [k for k in range(5) for _ in range(padded[k])]
    assert params.max_seqlen_q == max(padded)
    # an empty bin (every sample failed to decode) still gives the rank a step, without loss
    empty = te.pack_selected_samples([])
    assert empty.tokens.shape[0] == 8 and empty.loss_mask.sum() == 0
    assert empty.cu_seqlens.tolist() == [0, 8] and empty.num_real_tokens == 0
    te.sample_pad_multiple, te.pad_multiple = 1, 1


def test_pad_to_capacity_gives_every_packed_sequence_the_context_length(encoded):
    """Fixed shapes (the allgather MoE dispatcher under EP): the tail pads the last sample, so
    per-sample boundaries stay multiples of the CP pad and the real tokens are unchanged."""
    import dataclasses

    from omni_train.config.data import PackingConfig

    te, samples = encoded
    saved = (te.packing, te.sample_pad_multiple, te.pad_multiple)
    te.packing = dataclasses.replace(PackingConfig(enabled=True), pad_to_capacity=True)
    te.sample_pad_multiple, te.pad_multiple = 8, 2
    try:
        free = dataclasses.replace(te.packing, pad_to_capacity=False)
        p = te.pack_selected_samples(samples)
        te.packing = free
        ref = te.pack_selected_samples(samples)
        te.packing = dataclasses.replace(free, pad_to_capacity=True)
        empty = te.pack_selected_samples([])
    finally:
        te.packing, te.sample_pad_multiple, te.pad_multiple = saved
    assert p.tokens.shape[0] == te.context_length > ref.tokens.shape[0]
    assert p.cu_seqlens_padded[-1] == te.context_length
    assert p.cu_seqlens.tolist() == ref.cu_seqlens.tolist()
    assert p.cu_seqlens_padded[:-1].tolist() == ref.cu_seqlens_padded[:-1].tolist()
    assert all(int(n) % 8 == 0 for n in p.cu_seqlens_padded.diff())
    n = ref.tokens.shape[0]
    assert (p.tokens[:n] == ref.tokens).all() and p.loss_mask.sum() == ref.loss_mask.sum()
    assert empty.tokens.shape[0] == te.context_length and empty.loss_mask.sum() == 0


def test_over_long_sample_is_skipped_or_truncated_at_a_text_boundary(encoded):
    import json

    from omni_train.data.conversation import SampleError
    from omni_train.data.task_encoder import cook_raw

    te, _ = encoded
    long = {
        "conversation": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "word " * 2000},
        ]
    }
    sample = cook_raw("long", {"json": json.dumps(long).encode()})
    with pytest.raises(SampleError, match="exceed the context length 1024"):
        te.encode(sample)
    te.over_long = "truncate"
    try:
        out = te.encode(sample)
    finally:
        te.over_long = "skip"
    assert out.tokens.shape[0] == 1024 and out.loss_mask.sum() > 900


def test_packed_and_unpacked_training_give_the_same_loss(tmp_path):
    """2 ranks, 2 steps of the real loop: packed THD bins vs the same samples as padded rows.
    The loss is a mean over real tokens of all micro-batches and ranks, so both layouts give
    the same losses and gradients (fp32, up to summation order)."""
    import json
    from pathlib import Path

    from omni_train.datatools.prepare import synthesize
    from omni_train.stage.launch import torchrun

    synthesize(tmp_path / "synth", 16, seed=0)
    probe = Path(__file__).parent / "packing_probe.py"
    torchrun(2, str(probe), str(tmp_path / "synth"), str(tmp_path), timeout=600)
    r = json.loads((tmp_path / "packing.json").read_text())
    assert len(r["packed_losses"]) == 2 and all(len(b) > 1 for b in r["bins"])
    # step 1: the same weights, the same tokens -> the same loss and gradient
    assert r["packed_losses"][0] == pytest.approx(r["unpacked_losses"][0], rel=1e-6)
    assert r["packed_grad_norms"][0] == pytest.approx(r["unpacked_grad_norms"][0], rel=1e-5)
    # step 2 after one AdamW update: summation-order noise, amplified where a gradient is ~0
    assert r["packed_losses"][1] == pytest.approx(r["unpacked_losses"][1], rel=1e-4)
    assert r["packed_grad_norms"][1] == pytest.approx(r["unpacked_grad_norms"][1], rel=1e-2)
    assert r["num_samples"] > sum(len(b) for b in r["bins"])  # rank 0's bins + rank 1's
