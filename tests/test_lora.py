"""LoRA adapters (issue #38): adapters on every component of the tiny omni model leave its
outputs unchanged at the start and equal the merged weights after; only adapters train; bad
targets are errors; a LoRA stage under TP 2 + SP trains as one process does; its checkpoints
hold the adapters only, resume bit for bit and hand off to full and LoRA stages in another
layout (merged on load); a base that changed or is gone is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import EXACT, assert_close, differing_weights, launch

from omni_train.checkpoint import integrity
from omni_train.checkpoint.peft import check_base_chain, make_record, read_record, write_record
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


@pytest.fixture(scope="module")
def text_base(tmp_path_factory) -> tuple[Path, dict]:
    """A full text stage (2 steps, 1 process): the base the text LoRA stages start from."""
    out = tmp_path_factory.mktemp("lora_base")
    return out, launch(1, out, *EXACT, "trainer.train_steps=2", "parallel=single")


LORA_TEXT = [*EXACT, "peft=lora", "trainer.eval_at_start=true"]
SMALL_LR = ["optimizer.lr=1e-4", "optimizer.min_lr=0"]  # see the TP 2 test


@pytest.fixture(scope="module")
def text_lora_one(tmp_path_factory, text_base) -> dict:
    """The LoRA text stage in one process, from the base (lr 1e-4: see the TP 2 test)."""
    out = tmp_path_factory.mktemp("lora_one")
    return launch(1, out, *LORA_TEXT, *SMALL_LR, f"checkpoint.init_from={text_base[0]}",
                  "parallel=single")  # fmt: skip


@pytest.mark.distributed
@pytest.mark.xdist_group("lora_text")
@pytest.mark.parametrize(
    "layout",
    ["ep2", pytest.param("cp2", marks=pytest.mark.slow)],  # CI time: make test-slow
)
def test_a_lora_stage_under_ep2_and_cp2_trains_as_one_process(
    layout, tmp_path, text_base, text_lora_one
):
    """Adapters on every routed expert (EP 2: each rank its half, A drawn by the global
    expert index) and on a context-parallel LM (CP 2), from one base, equal one process."""
    one, dim = text_lora_one, layout[:2]
    run = launch(2, tmp_path, *LORA_TEXT, *SMALL_LR, f"checkpoint.init_from={text_base[0]}",
                 "parallel=single", f"parallel.{dim}=2")  # fmt: skip
    assert run["layout"][dim] == 2 and run["layout"]["dp"] == (2 if dim == "ep" else 1)
    assert_close(run["losses"], one["losses"], 1e-5, "loss")
    assert_close(run["grad_norms"], one["grad_norms"], 1e-4, "grad norm")
    assert run["parameters"] == one["parameters"] and one["parameters"]["llm"]["adapter"] > 0


def _lora_run(base_dir: Path) -> list[str]:
    return [*LORA_TEXT, "trainer.train_steps=4", "parallel=tp2", f"checkpoint.init_from={base_dir}"]


@pytest.fixture(scope="module")
def text_lora_tp2(tmp_path_factory, text_base) -> tuple[Path, dict]:
    """The LoRA text stage under TP 2 + SP from the base: 4 steps, one checkpoint."""
    out = tmp_path_factory.mktemp("lora_tp2")
    return out, launch(2, out, *_lora_run(text_base[0]))


@pytest.mark.distributed
@pytest.mark.xdist_group("lora_text")
def test_adapter_checkpoints_hold_adapters_and_hand_off_merged(tmp_path, text_base, text_lora_tp2):
    """full (1 process) -> LoRA (TP 2 + SP; its checkpoints: adapters and a base record) ->
    full and LoRA stages in 1 process, the adapters merged on load."""
    (base_dir, base), (lora_dir, whole) = text_base, text_lora_tp2
    base_ckpt = base_dir / "checkpoints" / "step_0000002"
    # full -> LoRA: B = 0, so the LoRA stage starts as the base ended (TP 2 vs 1 process)
    assert whole["eval_loss_at_start"] == pytest.approx(base["eval_loss"], rel=1e-6)
    ckpt = Path(whole["checkpoint"])
    record = read_record(ckpt)
    assert record["base"] == str(base_ckpt.resolve()) and record["whole"] == []
    assert whole["peft"]["base"] == record["base"] and whole["peft"]["rank"] == 16
    model_keys = [k for k in _tensor_keys(ckpt) if k.startswith("llm.")]
    assert model_keys and all(".lora." in k for k in model_keys)  # nothing of the base

    # LoRA (TP 2) -> full (1 process): the adapters merged into the weights it starts from
    after = [*EXACT, "trainer.train_steps=1", "parallel=single", "trainer.eval_at_start=true",
             f"checkpoint.init_from={lora_dir}"]  # fmt: skip
    full = launch(1, tmp_path / "full", *after)
    assert full["eval_loss_at_start"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    assert full["peft"] is None and read_record(Path(full["checkpoint"])) is None
    # LoRA -> LoRA: merged as well; fresh adapters on top, the chain recorded
    again = launch(1, tmp_path / "again", *after, "peft=lora")
    assert again["eval_loss_at_start"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    assert read_record(Path(again["checkpoint"]))["base"] == str(ckpt.resolve())
    assert check_base_chain(Path(again["checkpoint"])) == [ckpt.resolve(), base_ckpt.resolve()]

    # a resume keeps the adapters' settings (refused before anything is built)
    with pytest.raises(RuntimeError, match=r"it was trained with peft=.*'rank': 16.*Resume with "
                       r"the same peft settings"):  # fmt: skip
        launch(2, lora_dir, *_lora_run(base_dir), "peft.rank=8")


@pytest.mark.slow  # CI time (three more 2-process runs): make test-slow
@pytest.mark.distributed
@pytest.mark.xdist_group("lora_text")
def test_an_adapter_checkpoint_resumes_bit_identically(tmp_path, text_base, text_lora_tp2):
    """2 + 2 steps of the LoRA stage (TP 2 + SP, adapters-only checkpoints on the base) equal
    the 4 uninterrupted steps: losses, eval loss and every saved tensor, bit for bit."""
    (base_dir, _), (lora_dir, whole) = text_base, text_lora_tp2
    first = launch(2, tmp_path, *_lora_run(base_dir), "trainer.exit_after_steps=2")
    assert first["status"] == "interrupted"
    second = launch(2, tmp_path, *_lora_run(base_dir))
    assert second["resumed_from"].endswith("step_0000002")
    assert second["losses"] == whole["losses"] and second["eval_loss"] == whole["eval_loss"]
    num_tensors, differing = differing_weights(lora_dir, tmp_path)
    assert num_tensors > 10 and differing == []


def _tensor_keys(ckpt: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return sorted(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)


def test_an_adapter_checkpoint_refuses_a_base_that_changed_or_is_gone(tmp_path):
    base, ckpt = tmp_path / "base", tmp_path / "lora"
    base.mkdir()
    ckpt.mkdir()

    def save_base(content: bytes) -> None:  # a torch_dist folder with its integrity record
        (base / "metadata.json").write_text("{}")
        (base / "__0_0.distcp").write_bytes(content)
        names = integrity.files_of(base)
        integrity.write_record(base, integrity.digest_files(base, names, "head_tail"), "head_tail")

    save_base(b"a" * 100)
    write_record(ckpt, make_record({"method": "lora"}, [], base))
    assert check_base_chain(ckpt) == [base.resolve()]
    save_base(b"b" * 100)  # the base stage re-run into the same folder: intact, other weights
    with pytest.raises(ValueError, match=r"changed since the adapters were trained on it"):
        check_base_chain(ckpt)
    (base / "__0_0.distcp").write_bytes(b"c" * 99)  # damaged after its record
    with pytest.raises(ValueError, match=r"is damaged: __0_0.distcp is 99 bytes"):
        check_base_chain(ckpt)
    for f in base.iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"its base .* is gone. The adapters mean nothing"):
        check_base_chain(ckpt)
