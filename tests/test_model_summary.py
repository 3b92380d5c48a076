"""`omni-train model summary`: meta-device build, counts equal closed-form formulas.

The formulas (``omni_train.model.count``, which the launcher also uses to size checkpoints) are
written from the architecture spec, independently of the model code that megatron builds.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

from omni_train.config import compose_job
from omni_train.model.count import lm_params, parameter_counts


def expected(model: str) -> dict:
    m = compose_job([f"model={model}"]).model
    comps = parameter_counts(m)
    return {"components": comps, "total": sum(comps.values()), "active_per_token": lm_params(m)[1]}


# one worker for the module: the published-model test compares against the cached tiny summary
pytestmark = pytest.mark.xdist_group("model_summary")


@functools.cache
def _summary(model: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "model", "summary", f"model={model}", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_published_model_summary_matches_spec_and_formulas():
    summary = _summary("nano_omni_30b_a3b")
    want = expected("nano_omni_30b_a3b")
    assert summary["components"] == want["components"]
    assert summary["total"] == want["total"]
    assert summary["active_per_token"] == want["active_per_token"]
    assert summary["layers"] == {"M": 23, "*": 6, "-": 0, "E": 23}
    # The released checkpoint, exactly (../shared/spec/architecture.md, transformers 5.23).
    assert summary["components"] == {
        "llm": 31_577_937_344,
        "vision_encoder": 653_611_520,
        "vision_projector": 159_912_960,
        "audio_encoder": 608_879_616,
        "audio_projector": 15_205_376,
    }
    assert summary["total"] == 33_015_546_816
    # The spec's rounded figures: LM ~31.6B total / ~3.2B active, whole model ~33.0B.
    assert round(summary["components"]["llm"] / 1e9, 1) == 31.6
    assert round(summary["active_per_token"] / 1e9, 1) == 3.2
    assert round(summary["total"] / 1e9, 1) == 33.0
    # The meta-device build costs about what the tiny one does (imports dominate; measured
    # 18.8 vs 14.2 CPU s). CPU time, not wall time: CI runs two test workers on two cores, and
    # a wall-clock bound failed there (62 s) while the build itself was unchanged.
    tiny = _summary("tiny")
    assert summary["build_cpu_s"] < 2 * tiny["build_cpu_s"], (summary, tiny)
    # No weights allocated: 33B fp32 parameters would be 132 GB; the build stays near 1 GB.
    assert summary["peak_rss_mib"] < 2048, f"peak RSS {summary['peak_rss_mib']} MiB"


def test_tiny_model_summary_matches_formulas():
    summary = _summary("tiny")
    want = expected("tiny")
    assert summary["components"] == want["components"]
    assert summary["active_per_token"] == want["active_per_token"]
    assert set("M*E") <= {k for k, v in summary["layers"].items() if v}


def test_summary_table_output():
    out = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "model", "summary", "model=tiny"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("llm", "vision_encoder", "audio_projector", "total", "active per LM token"):
        assert name in out


@pytest.mark.parametrize("bad", ["model=nope", "model.vision.hidden_size=33"])
def test_summary_bad_config_is_one_line_error(bad):
    out = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "model", "summary", bad],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "omni-train: error:" in out.stderr and "Traceback" not in out.stderr
