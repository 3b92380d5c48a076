"""LoRA adapters (issue #38, first part): adapters on every component of the tiny omni model
leave its outputs unchanged at the start and equal the merged weights after; only adapters
train; bad targets are errors; a LoRA stage under TP 2 + SP trains as one process does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import assert_close, launch

from omni_train.config import compose_job, validate
from omni_train.stage.launch import torchrun

PROBE = str(Path(__file__).with_name("lora_probe.py"))
COMPONENTS = ["audio_encoder", "audio_projector", "llm", "vision_encoder", "vision_projector"]


def test_adapters_start_as_the_base_train_alone_and_merge_exactly(tmp_path):
    torchrun(1, PROBE, str(tmp_path), timeout=600)
    r = json.loads((tmp_path / "lora.json").read_text())
    assert r["adapted"] == COMPONENTS and r["num_adapted"] > 40
    assert r["trainable"] == [f"{c}.lora" for c in COMPONENTS]  # no base weight trains
    assert r["zero_b_equal"]  # B = 0: the base model's logits, bit for bit
    assert r["adapters_change_logits"]
    assert r["merged_max_rel_diff"] < 1e-5, r["merged_max_rel_diff"]
    e = r["errors"]
    assert "matches no module of this model" in e["nothing"]
    assert "is a TopKRouter" in e["router"] and "never a router or a norm" in e["router"]
    assert "targets modules of ['vision_encoder'], which stage.trainable=['llm']" in e["frozen"]


def test_peft_config_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown groups \['lm_attn'\]; valid: lm_attention"):
        compose_job(["peft.method=lora", "peft.targets=[lm_attn]"])
    with pytest.raises(ValueError, match="adapts nothing; e.g. peft.targets="):
        compose_job(["peft.method=lora"])
    cfg = compose_job(["stage=stage6_omni_sft_256k", "model=tiny", "peft=lora",
                       "peft.targets=[lm_attention,audio_blocks]"])  # fmt: skip
    with pytest.raises(ValueError, match=r"peft.targets=audio_blocks adapts audio_encoder, "
                       r"which stage.trainable"):  # fmt: skip
        validate(cfg, 2)


@pytest.mark.distributed
def test_a_lora_stage_under_tp2_sp_trains_as_one_process(tmp_path, synth_root):
    common = ["stage=smoke_omni", "model=tiny", "peft=lora", "trainer.precision=fp32",
              # step 2 runs the adapters with the B that step 1 trained
              "trainer.train_steps=2", "trainer.global_batch_size=2", "trainer.eval_iters=1",
              # 1e-4, as the equivalence matrix: Adam turns float noise into +-lr steps
              "optimizer.lr=1e-4", "optimizer.min_lr=0",
              f"data.synthetic_root={synth_root}", "data.packing.sample_pad_multiple=8",
              "peft.targets=[lm_attention,lm_mamba,lm_experts,lm_shared_expert,lm_mlp,"
              "vision_blocks,audio_blocks]"]  # fmt: skip
    one = launch(1, tmp_path / "one", *common, "parallel=single")
    two = launch(2, tmp_path / "tp2", *common, "parallel=tp2")
    assert_close(two["losses"], one["losses"], 1e-5, "loss")
    assert_close(two["grad_norms"], one["grad_norms"], 1e-4, "grad norm")
    assert two["parameters"] == one["parameters"]
    llm = one["parameters"]["llm"]
    assert llm["trainable"] == llm["adapter"] > 0  # the LM's base is frozen
    # the projectors carry no adapter here: they train whole
    assert one["parameters"]["vision_projector"]["adapter"] == 0
    assert one["parameters"]["vision_projector"]["frozen"] == 0
