"""Checkpoints across processes: TP=2 -> TP=1 weights, and resume == uninterrupted.

The first two are ``slow`` (``make test-slow``): the default suite covers the same contracts
with other runs (TP=2 -> TP=1: ``test_stages``' handoff; resume == uninterrupted: DP=2 with the
distributed optimizer on packed omni data in ``test_energon_data``, TP=2 in bf16 after a signal
in ``test_faults``)."""

import pytest
from launch import EXACT, differing_weights, launch

pytestmark = pytest.mark.distributed


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_in_the_middle_equals_uninterrupted(tmp_path, precision):
    """2 + 2 steps (DP=2, distributed optimizer: sharded optimizer state) == 4 steps.

    bf16 adds the fp32 main parameters of the mixed-precision optimizer to what must survive.
    """
    four = [*EXACT, "trainer.train_steps=4", "parallel=single", f"trainer.precision={precision}"]
    whole = launch(2, tmp_path / "whole", *four)
    first = launch(2, tmp_path / "split", *four, "trainer.exit_after_steps=2")
    assert first["status"] == "interrupted" and first["step"] == 2
    second = launch(2, tmp_path / "split", *four)
    assert second["status"] == "completed" and second["resumed_from"].endswith("step_0000002")
    assert second["losses"] == whole["losses"]
    assert second["eval_loss"] == whole["eval_loss"]
    num_tensors, differing = differing_weights(tmp_path / "whole", tmp_path / "split")
    assert num_tensors > 10 and differing == []


def test_stage_manifest_rerun_and_overwrite_guard(tmp_path):
    """The main job's contract: manifest fields, a completed stage re-runs as a no-op, and a
    fresh start refuses to overwrite existing checkpoints."""
    import subprocess
    import sys

    m = launch(1, tmp_path, *EXACT, "parallel=single")
    assert m["status"] == "completed" and m["step"] == 3 and len(m["losses"]) == 3
    assert m["final_loss"] == m["losses"][-1] and m["eval_loss"] is not None
    assert m["parameters"]["llm"]["trainable"] == m["trainable_parameters"] > 0
    # the smoke stage trains the LM only: encoders and projectors are frozen, counted per part
    encoders = [n for n in m["parameters"] if n != "llm"]
    assert set(encoders) == {
        "vision_encoder",
        "vision_projector",
        "audio_encoder",
        "audio_projector",
    }
    assert all(m["parameters"][n]["trainable"] == 0 for n in encoders)
    assert m["frozen_parameters"] == sum(m["parameters"][n]["frozen"] for n in encoders) > 0
    assert m["tokens"] == 3 * 4 * 64  # steps x global batch x sequence length
    assert len(m["config_hash"]) == 16 and m["checkpoint"].endswith("step_0000003")
    again = launch(1, tmp_path, *EXACT, "parallel=single")
    assert again["resumed_from"].endswith("step_0000003") and again["losses"] == m["losses"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omni_train.train",
            *EXACT,
            f"checkpoint.output_dir={tmp_path}",
            "checkpoint.resume=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "already holds checkpoints and checkpoint.resume=false" in proc.stderr
    with pytest.raises(RuntimeError, match="written by 1 ranks, this job has 2"):
        launch(2, tmp_path, *EXACT, "parallel=single", "trainer.train_steps=4")
