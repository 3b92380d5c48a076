"""``omni-train run --dry-run``: every full-scale stage resolves its published layout in one CPU
process (fake 256- to 1024-rank worlds, meta-device model) and fits its memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_curriculum import NAMES, TABLE

H100_GIB = 80

# One xdist worker for the module: the reports fixture (seven stages) then runs once.
pytestmark = pytest.mark.xdist_group("dry_run")

_RESOLVE_ALL = """
import json, sys
from omni_train.plan.dry_run import resolve
print(json.dumps([resolve([f"stage={name}"]) for name in sys.argv[1:]]))
"""


@pytest.fixture(scope="module")
def reports():
    """All seven stages in one process (imports once; each stage builds its own fake world)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE_ALL, *NAMES],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("k", range(7))
def test_dry_run_resolves_the_published_layout(reports, k):
    r = reports[k]
    g, nodes, cp = r["groups"], TABLE["nodes"][k], TABLE["cp"][k]
    world = nodes * 8
    assert r["stage"] == NAMES[k] and r["cluster"]["nodes"] == nodes
    assert (g["world"], g["tp"], g["cp"], g["pp"]) == (world, 2, cp, 1)
    assert g["dp"] == world // (2 * cp) and g["dp_x_cp"] == g["dp"] * cp
    assert (g["ep"], g["etp"]) == (32, 2) and g["expert_dp"] == world // 64
    assert r["sequence_parallel"] and r["distributed_optimizer"] and r["precision"] == "bf16"


@pytest.mark.parametrize("k", range(7))
def test_dry_run_memory_follows_the_freezing_policy_and_fits(reports, k):
    mem = reports[k]["memory"]
    trainable = TABLE["trainable"][k]
    for comp, row in mem["components"].items():
        assert row["params"] > 0
        assert (row["trainable"] == row["params"]) == (comp in trainable), comp
        assert (row["trainable"] == 0) == (comp not in trainable), comp
        assert row["grad_gib"] == pytest.approx(row["trainable"] * 4 / 1024**3)
        assert row["param_gib"] == pytest.approx(row["params"] * 2 / 1024**3)  # bf16
    # Parameters, gradients and optimizer state leave most of an H100 for activations.
    assert mem["total"]["total_gib"] < H100_GIB / 2


def test_stage6_layout_is_tp2_cp16_dp16_ep32(reports):
    g = reports[6]["groups"]
    assert (g["world"], g["tp"], g["cp"], g["dp"], g["ep"]) == (512, 2, 16, 16, 32)


def test_dry_run_cli_prints_the_layout_line():
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "run", "--dry-run", "stage=stage5_omni_sft_48k"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "layout: 64 nodes x 8 GPUs = 512 ranks = TP 2 x CP 2 x DP 128 (x PP 1);  "
        "experts: EP 32 x ETP 2 x expert-DP 8" in proc.stdout
    ), textwrap.shorten(proc.stdout, 2000)
    assert "per-rank parameters + gradients + optimizer:" in proc.stdout


def test_dry_run_rejects_an_invalid_layout_before_building():
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "run", "--dry-run",
         "stage=stage6_omni_sft_256k", "parallel.cp=64"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Mamba heads per TP rank do not split over parallel.cp=64" in proc.stderr


# -- the planner (omni-train plan): the same fake worlds plus measured activations -------------


@pytest.fixture(scope="module")
def plans(reports):
    from omni_train.plan import planner

    return [planner.plan([f"stage={name}"], dry=reports[k]) for k, name in enumerate(NAMES)]


@pytest.mark.parametrize("k", range(7))
def test_plan_breaks_memory_down_and_judges_it(plans, reports, k):
    p, mem = plans[k], reports[k]["memory"]["total"]
    m, parts = p["memory"], p["memory"]["parts_gib"]
    assert m["total_gib"] == pytest.approx(sum(parts.values()))
    assert (parts["weights"], parts["gradients"], parts["optimizer"]) == pytest.approx(
        (mem["param_gib"], mem["grad_gib"], mem["optimizer_gib"])
    )
    assert parts["activations.llm"] > 0
    assert (parts["activations.llm_cp_kv"] > 0) == (TABLE["cp"][k] > 1)
    vision, audio = (
        p["media_per_sequence"]["vision_tokens"],
        p["media_per_sequence"]["audio_tokens"],
    )
    assert ("activations.vision" in parts) == (vision > 0)
    assert ("activations.audio" in parts) == (audio > 0)
    assert m["gpu_gib"] == pytest.approx(79.6)
    share = m["total_gib"] / m["gpu_gib"]
    expected = "does not fit" if share > 1 else "tight" if share > 0.9 else "fits"
    assert m["verdict"] == expected
    assert (p["fix"] is not None) <= (expected == "does not fit")
    t, g = p["time"], p["groups"]
    assert t["gpu_hours"] == pytest.approx(t["stage_hours"] * g["world"])
    assert t["tokens_per_s"] == pytest.approx(
        TABLE["global_batch"][k] * TABLE["context"][k] / t["step_s"]
    )


@pytest.mark.parametrize("k", range(7))
def test_every_published_stage_fits_with_a_tenth_of_the_gpu_free(plans, k):
    m = plans[k]["memory"]
    assert m["verdict"] == "fits", (NAMES[k], m["total_gib"])
    assert m["total_gib"] <= 0.9 * m["gpu_gib"], (NAMES[k], m["total_gib"])


def test_encoders_are_sharded_over_cp_and_tp(plans):
    """Stage 6 (TP 2, CP 16): the ViT's pieces over the 16 CP ranks, within 10 % of even; its
    vision activations are the share of one rank, not the whole sequence's."""
    stage6 = plans[6]
    vision = stage6["encoder_shares"]["vision"]
    assert vision["group"] == 16 and 1.0 <= vision["imbalance"] <= 1.10
    assert stage6["encoder_shares"]["audio"]["group"] == 32
    # stage 3 (TP 2): the audio clips over the 2 TP ranks
    assert plans[3]["encoder_shares"]["audio"]["group"] == 2
    from omni_train.config import compose_job
    from omni_train.plan import planner
    from omni_train.plan.costs import ActivationCosts

    cfg = compose_job(["stage=stage6_omni_sft_256k"])
    costs, a = ActivationCosts.load(cfg.model, 2), planner.Assumptions()
    whole = planner.activations(cfg, costs, a, 1)["saved"]["vision"]  # one rank encodes all
    shard = planner.activations(cfg, costs, a, 16)["saved"]["vision"]
    assert whole / shard == pytest.approx(16 / vision["imbalance"])


def test_frozen_encoders_keep_no_activations(plans):
    # stage 0 trains the vision projector on a frozen ViT: only the projector side keeps
    # anything; stage 1 trains the ViT (with recompute) on the same kind of data
    stage0, stage1 = (plans[k]["memory"]["parts_gib"]["activations.vision"] for k in (0, 1))
    assert 0 < stage0 < stage1


def test_committed_plan_table_is_what_the_planner_says(plans):
    from pathlib import Path

    from omni_train.plan import planner

    text = (Path(__file__).parents[1] / "benchmarks/results/plan_stages.md").read_text()
    for p in plans:
        line = planner.verdict_line(p)
        assert line in text, f"regenerate with benchmarks/plan_stages.py: {line}"


def test_a_failing_stage_gets_the_smallest_fix(reports):
    from omni_train.plan import planner

    base = ["stage=stage4_omni_sft_16k", "recompute.audio_encoder=false",
            "recompute.projectors=false"]  # fmt: skip
    loose = planner.plan(base, dry=reports[4])["memory"]["total_gib"]
    both = planner.plan([*base, "recompute.audio_encoder=true", "recompute.projectors=true"],
                        dry=reports[4])["memory"]["total_gib"]  # fmt: skip
    assert both < loose
    gpu = (loose + both) / 2
    p = planner.plan([*base, f"cluster.gpu_memory_gib={gpu}"], dry=reports[4])
    assert p["memory"]["verdict"] == "does not fit"
    assert p["fix"]["change"].startswith("recompute more")
    assert p["fix"]["total_gib"] <= gpu
    assert "smallest fix: recompute more" in planner.verdict_line(p)


def test_run_prints_the_plan_verdict_before_launching():
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "run", "--nproc-per-node", "8",
         "stage=stage3_audio_encoder"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    # the verdict comes first; then the pre-flight refuses 8 ranks for a 1024-rank recipe
    assert proc.stdout.startswith("plan: stage3_audio_encoder: "), proc.stdout[-2000:]
    assert "GiB per rank of 79.6 GiB" in proc.stdout
    assert proc.returncode == 2 and "1024" in proc.stderr, proc.stderr[-2000:]


def test_a_lora_stage_keeps_no_lm_gradients_and_fits_on_fewer_nodes(reports):
    """peft=lora on stage 5: the LM's base gets no gradient or optimizer state (the encoders
    still train whole), its weight-gradient FLOPs are gone, and the stage fits on one node
    (the full stage needs 4: benchmarks/results/plan_lora.md, which must say what the
    planner says)."""
    from pathlib import Path

    from omni_train.plan import planner

    stage = ["stage=stage5_omni_sft_48k"]
    full = planner.plan(stage, dry=reports[5])
    lora = planner.plan([*stage, "peft=lora"])
    f, lo = full["memory"]["parts_gib"], lora["memory"]["parts_gib"]
    assert lo["gradients"] < f["gradients"] - 5 and lo["optimizer"] < f["optimizer"]
    assert 0 < lo["weights"] - f["weights"] < 0.1  # the adapters
    assert lora["time"]["step_s"] < full["time"]["step_s"]
    fewest = planner.fewest_nodes([*stage, "peft=lora"])
    assert fewest["nodes"] == 1 and fewest["verdict"] in ("fits", "tight")
    text = (Path(__file__).parents[1] / "benchmarks/results/plan_lora.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| stage5_omni_sft_48k"))
    assert f"| 1 (EP {fewest['ep']}, {fewest['total_gib']:.1f} GiB" in row, row
    assert f"{lora['memory']['total_gib']:.1f} ({lora['memory']['verdict']})" in row, row
    with pytest.raises(ValueError, match=r"adapts llm, which stage.trainable"):
        planner.plan(["stage=stage0_vision_projector_warmup", "peft=lora"])
