"""The tiny omni model in real processes: mixed media, TP=2 vs TP=1, packed vs one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_train.stage.launch import torchrun

PROBE = Path(__file__).with_name("omni_probe.py")

# One xdist worker for the module: the probes fixture (two runs) then runs once.
pytestmark = pytest.mark.xdist_group("omni_model")


def _torchrun(nproc: int, mode: str, out: Path, *overrides: str) -> dict:
    torchrun(nproc, str(PROBE), mode, str(out), *overrides)
    return json.loads((out / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("omni")
    reference = _torchrun(1, "reference", out)
    tp2 = _torchrun(2, "tp2", out, "parallel=tp2")  # TP=2 + sequence parallel
    return reference, tp2


@pytest.mark.distributed
def test_mixed_batch_forward_backward_reaches_every_component(probes):
    reference, _ = probes
    assert reference["mixed_loss_finite"]
    assert reference["params_without_grad"] == []
    for name, total in reference["grad_abs_sum"].items():
        assert total > 0, f"{name} received no gradient"
    assert set(reference["grad_abs_sum"]) == {
        "llm",
        "vision_encoder",
        "vision_projector",
        "audio_encoder",
        "audio_projector",
    }


@pytest.mark.distributed
def test_placeholder_mismatch_names_sample_and_modality(probes):
    errors = probes[0]["errors"]
    extra = errors["extra_image_placeholder"]
    assert extra and "sample 1 ('images')" in extra and "11 image/video placeholder" in extra
    assert "yield 10 features" in extra
    missing = errors["audio_without_placeholders"]
    assert missing and "sample 0" in missing and "0 audio placeholder" in missing


@pytest.mark.distributed
def test_video_and_image_fill_the_shared_placeholder_in_token_order(probes):
    assert probes[0]["image_after_video_in_place"]


@pytest.mark.distributed
def test_tp2_logits_equal_tp1(probes):
    _, tp2 = probes
    assert tp2["layout"].startswith("world=2 tp=2")
    assert tp2["logits_max_rel_diff"] < 1e-5


@pytest.mark.distributed
def test_packed_three_samples_equal_one_by_one(probes):
    _, tp2 = probes
    assert tp2["packed_lengths"] == [23, 15, 38]  # 2 s of audio: 26 tokens (1 + 200 frames)
    for k, diff in enumerate(tp2["packed_per_token_loss_max_rel_diff"]):
        assert diff < 1e-5, f"sample {k}: per-token loss differs by {diff:.2e} when packed"


@pytest.mark.distributed
def test_cpe_eval_part_switches_off_the_random_crop(probes):
    assert probes[0]["cpe_random_in_train"]
    assert probes[0]["cpe_eval_part_equals_eval"]


@pytest.mark.distributed
def test_text_only_training_with_every_component_trainable(tmp_path):
    """Absent modalities must not break DDP or the distributed optimizer: encoders that see no
    media still get (zero) gradients, every rank steps the same parameter set."""
    from launch import EXACT, launch

    every = "stage.trainable=[llm,vision_encoder,vision_projector,audio_encoder,audio_projector]"
    m = launch(2, tmp_path, *EXACT, "parallel=single", every)
    assert m["status"] == "completed" and m["frozen_parameters"] == 0
    assert all(loss == loss for loss in m["losses"]) and len(m["losses"]) == 3
    assert m["parameters"]["audio_encoder"]["trainable"] > 0
