"""The curriculum's stages on the tiny model, in real processes: per-stage freezing, recompute
equivalence, the TP=2 -> TP=1 handoff, pretrained components for stage 0, and the
``omni-train curriculum`` command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import differing_weights, launch
from test_curriculum import NAMES

from omni_train.stage.launch import torchrun

PROBE = str(Path(__file__).with_name("stage_probe.py"))

# One xdist worker for the module: the freezing fixture (every stage, ~3 min) then runs once.
pytestmark = pytest.mark.xdist_group("stages")


@pytest.fixture(scope="module")
def freezing(tmp_path_factory, synth_root) -> dict:
    out = tmp_path_factory.mktemp("freezing")
    torchrun(2, PROBE, "freezing", str(out), str(synth_root))
    return json.loads((out / "freezing.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_frozen_components_are_bit_identical_and_trainable_ones_change(freezing, name):
    stage = freezing[name]
    for component, unchanged in stage["unchanged"].items():
        if component in stage["trainable"]:
            assert not unchanged, f"{name}: trainable {component} did not change"
        else:  # parameters and buffers (BatchNorm statistics, MoE expert bias)
            assert unchanged, f"{name}: frozen {component}: {stage['changed_tensors']}"
    assert stage["frozen_with_grad"] == 0
    assert stage["ddp_params_are_trainable"]  # DDP buffers hold exactly the trainable params
    assert stage["optimizer_numel"] == stage["trainable_numel"]  # dp=1: the whole shard
    frozen_encoders = [
        c for c in ("vision_encoder", "audio_encoder") if c not in stage["trainable"]
    ]
    assert stage["eval_mode"] == sorted(frozen_encoders)
    assert stage["cpe_eval"] == (name[:6] in ("stage1", "stage4", "stage5"))


def test_recompute_on_and_off_give_identical_loss_and_gradients(tmp_path, synth_root):
    """recompute=all: LM core_attn, mlp, layernorm, moe; ViT full; audio layers; projectors.
    Bit-identical, not merely close: a failure names the parameters whose gradients differ."""
    torchrun(2, PROBE, "recompute", str(tmp_path), str(synth_root), "recompute=all")
    r = json.loads((tmp_path / "recompute.json").read_text())
    assert r["loss_equal"], r["loss_max_diff"]
    assert r["grad_names_equal"] and r["num_grads"] > 100
    assert r["grads_differing"] == [], r["grad_max_rel_diff"]
    assert r["buffers_differing"] == []  # BatchNorm statistics updated once, not twice


TINY = ["model=tiny", "trainer.train_steps=2"]


def test_handoff_tp2_to_tp1_reproduces_the_saved_eval_loss(tmp_path, synth_root):
    data = f"data.synthetic_root={synth_root}"
    s0 = launch(2, tmp_path / "s0", f"stage={NAMES[0]}", *TINY, data, "parallel=tp2")
    assert s0["status"] == "completed" and s0["layout"]["tp"] == 2
    # stage 1 on one process at TP=1, evaluated before its first step on stage 0's eval data
    s1 = launch(
        1,
        tmp_path / "s1",
        f"stage={NAMES[1]}",
        *TINY,
        data,
        "parallel=single",
        "blend=stage0",
        "trainer.eval_at_start=true",
        f"checkpoint.init_from={tmp_path / 's0'}",
    )
    assert s1["layout"]["tp"] == 1 and s1["init_from"] == str(tmp_path / "s0")
    assert s1["eval_loss_at_start"] == pytest.approx(s0["eval_loss"], rel=1e-5)
    # pretrained components (stage 0's interface): the LM from s0, the rest freshly drawn with
    # another seed; the LM is frozen in stage 0, so it must come out bit-identical
    c0 = launch(
        2,  # s0's layout: the checkpoint comparison below needs the same optimizer shards
        tmp_path / "c0",
        f"stage={NAMES[0]}",
        *TINY,
        data,
        "parallel=tp2",
        "trainer.seed=99",
        f"+checkpoint.init_components.llm={tmp_path / 's0'}",
    )
    assert c0["init_components"] == {"llm": str(tmp_path / "s0")}
    num, differing = differing_weights(tmp_path / "s0", tmp_path / "c0")
    assert num > 50 and differing
    assert not [k for k in differing if k.startswith("llm.")], differing
    assert {k.split(".")[0] for k in differing} >= {"vision_encoder", "vision_projector"}


@pytest.mark.slow
def test_curriculum_command_end_to_end(tmp_path, synth_root):
    """``omni-train curriculum model=tiny`` (1 step per stage): every stage completes from the
    previous one; a re-run skips them all; --from reruns the tail."""
    cmd = [
        sys.executable,
        "-m",
        "omni_train.cli",
        "curriculum",
        "--runs-dir",
        str(tmp_path),
        "model=tiny",
        "trainer.train_steps=1",
        f"data.synthetic_root={synth_root}",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert first.returncode == 0, first.stderr[-4000:]
    for i, name in enumerate(NAMES):
        m = json.loads((tmp_path / "tiny" / name / "manifest.json").read_text())
        assert (m["status"], m["step"], m["stage_index"]) == ("completed", 1, i)
        assert m["init_from"] == (str(tmp_path / "tiny" / NAMES[i - 1]) if i else None)
        assert name in first.stdout
    again = subprocess.run([*cmd, "--plan"], capture_output=True, text=True, env=env)
    assert [line.split()[0] for line in again.stdout.splitlines()] == ["skip"] * 7
    tail = subprocess.run([*cmd, "--from", "6"], capture_output=True, text=True, env=env)
    assert tail.returncode == 0, tail.stderr[-4000:]
    rows = [line.split() for line in tail.stdout.splitlines() if line.startswith("stage")]
    assert [r[1] for r in rows[1:]] == ["skip"] * 6 + ["rerun"]
