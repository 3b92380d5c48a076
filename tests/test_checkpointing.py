"""Checkpoints across processes: TP=2 -> TP=1 weights, and resume == uninterrupted."""

import pytest
import torch
from launch import EXACT, launch

pytestmark = pytest.mark.distributed


def test_tp2_checkpoint_loads_at_tp1_with_identical_eval_loss(tmp_path):
    tp2 = launch(2, tmp_path / "tp2", *EXACT, "parallel=tp2")
    tp1 = launch(
        1,
        tmp_path / "tp1",
        *EXACT,
        "parallel=single",
        f"checkpoint.init_from={tmp_path / 'tp2'}",
        "trainer.eval_at_start=true",
        "trainer.train_steps=1",
    )
    # weights only: a fresh run at step 0 -> 1, not a resume
    assert tp1["resumed_from"] is None and tp1["step"] == 1
    assert tp1["eval_loss_at_start"] == pytest.approx(tp2["eval_loss"], rel=1e-6)


def _weights(run_dir):
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    from omni_train.checkpoint import find_latest

    tensors = load_plain_tensors(str(find_latest(run_dir)))
    return {k: v for k, v in tensors.items() if k.startswith("decoder") or k.startswith(("embedding", "output"))}


def test_resume_in_the_middle_equals_uninterrupted(tmp_path):
    """2 + 2 steps (DP=2, distributed optimizer: sharded optimizer state) == 4 steps."""
    four = [*EXACT, "trainer.train_steps=4", "parallel=single"]
    whole = launch(2, tmp_path / "whole", *four)
    first = launch(2, tmp_path / "split", *four, "trainer.exit_after_steps=2")
    assert first["status"] == "interrupted" and first["step"] == 2
    second = launch(2, tmp_path / "split", *four)
    assert second["status"] == "completed" and second["resumed_from"].endswith("step_0000002")
    assert second["losses"] == whole["losses"]
    assert second["eval_loss"] == whole["eval_loss"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
