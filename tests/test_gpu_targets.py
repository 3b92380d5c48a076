"""The GPU smoke target, its recipes and the GPU CI workflow, as far as a CPU machine can check
them (the target itself ran here with SMOKE_PLATFORM=cpu: docs/gpu.md)."""

import subprocess
from pathlib import Path

import pytest
import yaml

from omni_train.config import compose_job
from omni_train.config.validation import check_platform, validate
from omni_train.platform.capabilities import Libraries, choose

ROOT = Path(__file__).resolve().parents[1]


def _make_n(*args: str) -> str:
    return subprocess.run(
        ["make", "-n", "smoke-gpu", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize(("ngpus", "layouts"), [("1", ["single"]), ("2", ["tp2", "cp2", "ep2"])])
def test_smoke_gpu_runs_each_layout_in_bf16_on_cuda(ngpus, layouts):
    script = _make_n(f"NGPUS={ngpus}")
    assert "OMNI_TRAIN_PLATFORM=cuda" in script and "stage=smoke_omni_gpu" in script
    assert f"for layout in {' '.join(layouts)}; do" in script
    for layout in layouts:
        cfg = compose_job(["stage=smoke_omni_gpu", "model=tiny", f"parallel={layout}"])
        assert cfg.trainer.precision == "bf16" and cfg.data.packing.enabled
        validate(cfg, int(ngpus), data=False)
        te = choose(Libraries(True, True, True, True, True, True))
        check_platform(cfg, te)  # bf16 + packed: Transformer Engine can run it


def test_fp32_packed_on_te_attention_is_refused_before_the_model_is_built():
    cfg = compose_job(["stage=smoke_omni", "model=tiny"])  # the CPU smoke: fp32, packed
    te = choose(Libraries(True, True, False, True, False, True))
    with pytest.raises(ValueError, match="set trainer.precision=bf16"):
        check_platform(cfg, te)
    for no_te in (
        choose(Libraries(True, False, False, True, False, True)),  # CUDA, flex attention
        choose(Libraries(False, False, False, False, False, True)),  # the CPU
    ):
        check_platform(cfg, no_te)  # fp32 packed runs on the PyTorch attention
    text = compose_job(["stage=smoke", "model=tiny", "trainer.precision=fp32"])
    assert not text.data.packing.enabled and text.data.kind == "synthetic"
    check_platform(text, te)  # unpacked text tokens: TE has fp32 backends for those


def test_gpu_workflow_builds_the_image_and_runs_both_smoke_sizes():
    workflow = yaml.safe_load((ROOT / ".github/workflows/gpu-smoke.yml").read_text())
    steps = workflow["jobs"]["smoke"]["steps"]
    commands = " ".join(s.get("run", "") for s in steps)
    assert "docker build -f docker/Dockerfile" in commands
    assert "make smoke-gpu NGPUS=1" in commands and "make smoke-gpu NGPUS=2" in commands
    assert "self-hosted" in workflow["jobs"]["smoke"]["runs-on"]
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert "COPY Makefile ./" in dockerfile  # the workflow runs make inside the image


def test_gpu_init_is_tp_invariant_unless_switched_off():
    """CPU initialisation (full weights from the CPU RNG, sliced per TP rank; the Mamba mixer
    re-drawn likewise) is what makes TP=1 and TP=2 start from one model; on CUDA it is the
    default too (the CPU tests show the invariance itself: test_parallel_equivalence)."""
    from omni_train.model.build import transformer_config, vision_transformer_config

    cuda = choose(Libraries(True, False, False, True, False, True))
    cfg = compose_job(["stage=smoke_omni_gpu", "model=tiny", "parallel=tp2"])
    assert transformer_config(cfg, cuda).use_cpu_initialization
    assert vision_transformer_config(cfg, cuda).use_cpu_initialization
    cfg.trainer.tp_invariant_init = False
    assert not transformer_config(cfg, cuda).use_cpu_initialization
    cpu = choose(Libraries(False, False, False, False, False, True))
    assert transformer_config(cfg, cpu).use_cpu_initialization  # the CPU always


def test_a_lora_stage_builds_megatron_cores_own_layers_where_te_is_installed(monkeypatch):
    """TE's linears have no LoRA adapters: OMNI_TRAIN_TRANSFORMER_ENGINE=off (the stage runner
    sets it for peft) picks the CUDA-without-TE blocks; TE's fused Adam stays."""
    from omni_train.platform.capabilities import TE_SWITCH, transformer_engine_off

    everything = Libraries(True, True, True, True, True, True)
    off = choose(everything, te_off=True)
    assert (off.linear, off.attention, off.experts) == ("torch", "flex", "sequential")
    assert "no_transformer_engine" in off.patch_sets and off.optimizer == "te_fused_adam"
    assert choose(everything).linear == "te"
    monkeypatch.setenv(TE_SWITCH, "off")
    assert transformer_engine_off()
    monkeypatch.setenv(TE_SWITCH, "maybe")
    with pytest.raises(ValueError, match="use 'on', 'off' or leave it unset"):
        transformer_engine_off()
