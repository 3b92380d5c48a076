"""Parallel layouts in 2 real gloo processes equal the single-process run.

Every run: the tiny LM (attention, MoE, MLP), the same synthetic data, 3 fp32 steps.
"""

import pytest
from launch import EXACT, assert_close, launch

pytestmark = pytest.mark.distributed

RTOL_LOSS = 1e-5
RTOL_GRAD_NORM = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """World of one: DP=1 running 2 micro-batches per step."""
    out = tmp_path_factory.mktemp("ref")
    return out, launch(1, out, *EXACT, "parallel=single")


def test_tp2_equals_tp1(reference, tmp_path):
    _, ref = reference
    tp2 = launch(2, tmp_path, *EXACT, "parallel=tp2")  # TP=2 with sequence parallel
    assert tp2["layout"]["tp"] == 2 and tp2["layout"]["dp"] == 1
    assert_close(tp2["losses"], ref["losses"], RTOL_LOSS, "loss")
    assert_close(tp2["grad_norms"], ref["grad_norms"], RTOL_GRAD_NORM, "grad norm")
    assert tp2["trainable_parameters"] == ref["trainable_parameters"]


def test_dp2_distributed_optimizer_equals_dp1_with_twice_the_microbatches(reference, tmp_path):
    _, ref = reference
    dp2 = launch(2, tmp_path, *EXACT, "parallel=single", "parallel.distributed_optimizer=true")
    assert dp2["layout"]["dp"] == 2
    assert_close(dp2["losses"], ref["losses"], RTOL_LOSS, "loss")
    assert_close(dp2["grad_norms"], ref["grad_norms"], RTOL_GRAD_NORM, "grad norm")


def test_ep2_equals_ep1(reference, tmp_path):
    """Both start from the reference's weights: expert init draws differ per EP layout, so the
    comparison starts from one checkpoint, resharded over experts by dist_checkpointing."""
    ref_dir, _ = reference
    init = [f"checkpoint.init_from={ref_dir}"]
    ep1 = launch(1, tmp_path / "ep1", *EXACT, "parallel=single", *init)
    ep2 = launch(2, tmp_path / "ep2", *EXACT, "parallel=ep2", *init)
    assert ep2["layout"]["ep"] == 2
    assert ep1["trainable_parameters"] == ep2["trainable_parameters"]
    assert_close(ep2["losses"], ep1["losses"], RTOL_LOSS, "loss")
    assert_close(ep2["grad_norms"], ep1["grad_norms"], RTOL_GRAD_NORM, "grad norm")
