"""Synthetic data and the micro-batch stream: determinism, layout independence, resume."""

import importlib
import inspect
import re

import pytest
import torch

from omni_train.data import MicroBatches, SyntheticTokens, microbatch


def _stream(dp_size, dp_rank, mbs=2, gbs=8, consumed=0):
    src = SyntheticTokens(vocab_size=512, seq_length=16, seed=7)
    return MicroBatches(
        src,
        micro_batch_size=mbs,
        global_batch_size=gbs,
        dp_size=dp_size,
        dp_rank=dp_rank,
        device=torch.device("cpu"),
        consumed_samples=consumed,
    )


def test_samples_are_deterministic_and_splits_disjoint():
    a = SyntheticTokens(512, 16, seed=7)
    assert (a.tokens(3) == SyntheticTokens(512, 16, seed=7).tokens(3)).all()
    assert not (a.tokens(3) == a.tokens(4)).all()
    assert not (a.tokens(3) == SyntheticTokens(512, 16, seed=7, split="eval").tokens(3)).all()
    assert a.tokens(0).shape == (17,) and a.tokens(0).max() < 512


def test_batch_fields_and_shapes():
    batch = next(_stream(1, 0))
    assert batch.tokens.shape == batch.labels.shape == (2, 16)
    assert torch.equal(batch.tokens[:, 1:], batch.labels[:, :-1])  # next-token labels
    assert batch.loss_mask.sum() == 32
    assert torch.equal(batch.position_ids[0], torch.arange(16))


def _step_tokens(stream, num_microbatches):
    return torch.cat([next(stream).tokens for _ in range(num_microbatches)])


def test_a_step_sees_the_same_samples_for_any_dp_layout():
    """DP=2 x 2 micro-batches and DP=1 x 4 micro-batches consume the same global batch."""
    one = _stream(1, 0)
    r0, r1 = _stream(2, 0), _stream(2, 1)
    for _step in range(2):
        whole = _step_tokens(one, 4)
        split = torch.cat([_step_tokens(r0, 2), _step_tokens(r1, 2)])
        assert torch.equal(whole, split)


def test_state_restores_the_identical_next_batch():
    s = _stream(2, 1)
    _step_tokens(s, 2)
    state = s.state_dict()
    expected = _step_tokens(s, 2)
    resumed = _stream(2, 1)
    resumed.load_state_dict(state)
    assert torch.equal(_step_tokens(resumed, 2), expected)


def test_dataset_tooling_stays_off_the_runtime_path():
    """A training process (entry point, loaders, task encoder, forward step, loop) never
    imports omni_train.datatools: converting and making datasets is not training."""
    import subprocess
    import sys

    code = (
        "import sys, omni_train.train, omni_train.stage.runner, omni_train.data.loader, "
        "omni_train.data.task_encoder, omni_train.training.forward_step, omni_train.training.loop; "
        "print(sorted(m for m in sys.modules if m.startswith('omni_train.datatools')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_micro_batch_rejects_mismatched_fields():
    from omni_train.data.microbatch import MicroBatch

    ids = torch.zeros(2, 8, dtype=torch.int64)
    ok = MicroBatch(ids, ids, torch.ones(2, 8), ids)
    assert ok.media.images == [] and ok.packed_seq_params is None
    with pytest.raises(ValueError, match=r"must all be \[b, s\]"):
        MicroBatch(ids, ids[:, :7], torch.ones(2, 8), ids)
    with pytest.raises(ValueError, match="labels must be int64"):
        MicroBatch(ids, ids.float(), torch.ones(2, 8), ids)


@pytest.mark.parametrize(
    ("stream", "protocol"),
    [
        ("omni_train.data.batches:MicroBatches", "TrainStream"),
        ("omni_train.data.batches:MicroBatches", "EvalStream"),
        ("omni_train.data.loader:EnergonBatches", "TrainStream"),
        ("omni_train.data.loader:EnergonEvalBatches", "EvalStream"),
    ],
)
def test_every_stream_has_every_member_of_its_protocol(stream, protocol):
    # the runner and the loop call these without probing (no getattr): a stream that lacks one
    # would fail only at the first evaluation or checkpoint of a long run
    module, name = stream.split(":")
    cls = getattr(importlib.import_module(module), name)
    wanted = set()
    for base in inspect.getmro(getattr(microbatch, protocol)):
        if base.__module__ == microbatch.__name__:
            wanted |= {
                m for m in vars(base) if not m.startswith("_") or m in ("__iter__", "__next__")
            }
    missing = [
        m for m in sorted(wanted) if not hasattr(cls, m) and m not in _instance_attributes(cls)
    ]
    assert missing == [], f"{name} lacks {missing} of {protocol}"


def _instance_attributes(cls) -> set[str]:
    """Attributes ``__init__`` assigns (``self.x = ...``), read from its source."""
    return set(re.findall(r"self\.(\w+)\s*[:=]", inspect.getsource(cls.__init__)))
