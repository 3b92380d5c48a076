"""The planner's activation model against fresh CPU measurements, and its inputs.

The committed costs of the tiny model (``omni_train/plan/activation_costs/tiny_tp1.json``, fitted
at 128/256/512 tokens, 16/36/64 patches, 25/50/75 frames) must predict a new measurement at sizes
between the fit points (384 tokens, 48 patches, 60 frames) within 5 % for every layer kind and
setting, and the per-kind costs must add up to the whole LM measured in one piece. The
full-scale plans (they reuse the dry run's fake worlds) are tested in ``test_dry_run.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from omni_train.config import compose_job
from omni_train.plan import planner
from omni_train.plan.costs import COSTS_DIR, ActivationCosts, Fit

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.05
SIZES = {"lm": 384, "vision": 48, "audio": 60}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("measure") / "tiny.json"
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.plan.measure", "--model", "tiny", "--out", str(out),
         "--lm-tokens", str(SIZES["lm"]), "--vit-patches", str(SIZES["vision"]),
         "--audio-frames", str(SIZES["audio"]), "--whole-lm", str(SIZES["lm"])],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, OMNI_TRAIN_PLATFORM="cpu", CUDA_VISIBLE_DEVICES="",
                 PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def committed():
    return ActivationCosts.load(compose_job(["model=tiny"]).model, tp=1)


def _close(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= TOLERANCE * abs(measured) + 64  # 64 B: rounding of 0


def test_every_kind_and_setting_is_predicted_within_5_percent(fresh, committed):
    checked, wrong = 0, []
    for kind, by_key in fresh["points"].items():
        if "transient" in kind or kind == "whole_lm":
            continue
        for key, [(n, measured, *_)] in by_key.items():
            predicted = committed.saved(kind, key)(n)
            checked += 1
            if not _close(predicted, measured):
                wrong.append(f"{kind} {key} at {n}: predicted {predicted:.0f}, measured {measured}")
    assert not wrong, "\n".join(wrong)
    # LM: head + 4 kinds x 4 settings; the Mamba kernel alone (its graph, its input);
    # encoders: 2 kinds x 6 settings each
    assert checked == 5 * 4 + 2 + 2 * 6 * 2


def test_layer_costs_add_up_to_the_whole_lm(fresh, committed):
    pattern = compose_job(["model=tiny"]).model.hybrid_pattern
    for key, [(n, measured, *_)] in fresh["points"]["whole_lm"].items():
        predicted = sum(committed.saved(k, key)(n) for k in pattern)
        predicted += committed.saved("head", key)(n)
        assert _close(predicted, measured), (key, predicted, measured)


def test_recompute_and_freezing_lower_what_is_kept(committed):
    n = 512
    for kind in ("E", "-", "*"):  # selective recompute covers MoE, MLP and core attention
        assert committed.saved(kind, "rc=on|train")(n) < committed.saved(kind, "rc=off|train")(n)
        # a frozen layer keeps no inputs for weight gradients
        assert committed.saved(kind, "rc=off|frozen")(n) < committed.saved(kind, "rc=off|train")(n)
    for kind in ("vit_block", "conformer_layer"):
        on = committed.saved(kind, "rc=on|train|proj_rc=off")(64)
        off = committed.saved(kind, "rc=off|train|proj_rc=off")(64)
        assert 0 < on < off / 5, (kind, on, off)
        assert committed.saved(kind, "rc=off|frozen|proj_rc=off")(64) == pytest.approx(0, abs=64)


def test_saved_tensor_hooks_agree_with_the_live_count(committed):
    """Autograd's saved-tensor hooks see every stored tensor (each storage once); the live
    count sees those plus whatever else the forward leaves alive. They agree for every layer
    without torch's non-reentrant checkpoint; with it (the conformer under recompute) hooks
    miss the inputs the checkpoint holds, which the planner must count."""
    for kind, by_key in committed.record["points"].items():
        if "transient" in kind:
            continue
        for key, rows in by_key.items():
            n = rows[-1][0]
            live, hooked = committed.saved(kind, key)(n), committed.hooked(kind, key)(n)
            assert hooked <= live * 1.01 + 64, (kind, key, hooked, live)
            if kind in ("M", "*", "-", "head", "vit_block", "vision_rest"):
                assert hooked == pytest.approx(live, rel=0.02, abs=64), (kind, key)
    held = "rc=on|train|proj_rc=off"
    assert committed.hooked("conformer_layer", held)(75) < 0.2 * committed.saved(
        "conformer_layer", held
    )(75)


def test_fits_are_least_squares_and_the_gpu_drops_the_cpu_mask():
    fit = Fit.of([(1, 3), (2, 5), (3, 7)], quadratic=False)
    assert (fit.c0, fit.c1) == pytest.approx((1, 2))
    quad = Fit.of([(1, 6), (2, 17), (3, 34)], quadratic=True)  # 1 + 2n + 3n^2
    assert (quad.c0, quad.c1, quad.c2) == pytest.approx((1, 2, 3))
    costs = ActivationCosts.load(compose_job(["model=tiny"]).model, tp=1)
    key = "rc=off|train|proj_rc=off"
    assert costs.saved("vit_block", key, gpu=True).c2 == 0
    assert costs.saved("vit_block", key).c2 > 0  # the CPU attention mask: ~1 byte per pair
    assert costs.saved("conformer_layer", key, gpu=True).c2 > 0  # NeMo keeps its scores


def test_an_unmeasured_layout_is_refused_with_the_command_that_measures_it():
    with pytest.raises(ValueError, match=r"make activation-costs MODEL=tiny TP=4"):
        ActivationCosts.load(compose_job(["model=tiny"]).model, tp=4)


def test_every_committed_cost_file_names_its_model_and_layout():
    files = sorted(COSTS_DIR.glob("*.json"))
    assert {p.name for p in files} >= {"tiny_tp1.json", "nano_omni_30b_a3b_tp2.json"}
    for path in files:
        record = json.loads(path.read_text())
        cfg = compose_job([f"model={record['model_name']}"]).model
        assert ActivationCosts.load(cfg, record["tp"]).path == path


def test_media_mix_covers_every_blend_variable():
    from omni_train.config.blends import available_blends, blend_variables

    mix = yaml.safe_load(planner.MEDIA_MIX.read_text())
    for blend in available_blends():
        for var in blend_variables(blend):
            shares = mix[var]
            assert shares["vision"] >= 0 and shares["audio"] >= 0, var
            assert shares["vision"] + shares["audio"] <= 1, var
    vision, audio, rows = planner.media_shares("stage2")
    assert vision == 0 and audio == pytest.approx(0.65)  # stage 2 is ASR only
    assert sum(r["share"] for r in rows) == pytest.approx(1)


CALIBRATION = """
# GPU results
```plan-calibration
{"overrides": ["stage=stage4_omni_sft_16k", "cluster.nodes=1"], "measured_peak_gib": 41.5,
 "tolerance": 0.15}
```
"""


def test_calibration_blocks_are_read_from_gpu_results(tmp_path):
    (tmp_path / "gpu_h100_stage4.md").write_text(CALIBRATION)
    (tmp_path / "mamba_scan_cpu.md").write_text(CALIBRATION)  # not a gpu_ file: ignored
    points = planner.calibration_points(tmp_path)
    overrides = ["stage=stage4_omni_sft_16k", "cluster.nodes=1"]
    assert points == [{"file": "gpu_h100_stage4.md", "overrides": overrides,
                       "measured_peak_gib": 41.5, "tolerance": 0.15}]  # fmt: skip


@pytest.mark.parametrize(
    "point",
    planner.calibration_points(ROOT / "benchmarks" / "results")
    or [pytest.param(None, marks=pytest.mark.skip(reason="no GPU measurement committed yet"))],
)
def test_plan_matches_measured_gpu_peaks(point):
    predicted = planner.plan(point["overrides"])["memory"]["total_gib"]
    measured = point["measured_peak_gib"]
    assert abs(predicted - measured) <= point["tolerance"] * measured, (predicted, measured)
