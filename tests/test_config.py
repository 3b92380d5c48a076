"""Config composition and validation: every invalid config fails before any process starts."""

import subprocess
import sys

import pytest

from omni_train.config import compose_job, validate


def test_default_composes_and_validates():
    cfg = compose_job([])
    assert (cfg.stage.name, cfg.model.name) == ("smoke", "tiny")
    assert cfg.model.num_layers == len(cfg.model.hybrid_pattern) == 6
    assert set(cfg.model.hybrid_pattern) == {"M", "*", "E", "-"}  # every layer kind
    assert cfg.model.components == [
        "llm",
        "vision_encoder",
        "vision_projector",
        "audio_encoder",
        "audio_projector",
    ]
    assert cfg.parallel.expert_tp == cfg.parallel.tp  # etp follows tp unless set
    assert cfg.checkpoint.output_dir == "runs/smoke"  # interpolated from the stage name
    validate(cfg, 1)


@pytest.mark.parametrize(
    ("group", "name", "valid"), [("model", "nope", "tiny"), ("stage", "stage9", "smoke")]
)
def test_unknown_group_option_lists_valid_names(group, name, valid):
    with pytest.raises(ValueError, match=rf"unknown {group} '{name}'; valid: .*{valid}"):
        compose_job([f"{group}={name}"])


# (overrides, world size, message fragment): one row per cross-field rule.
INVALID = [
    (["parallel.tp=2", "parallel.sp=true"], 3, "world size 3 is not divisible by tp x cp x pp"),
    (["parallel.ep=3"], 3, "parallel.ep=3 does not divide model.num_moe_experts=4"),
    (["parallel.ep=2"], 3, "world size 3 is not divisible by ep x etp"),
    (
        ["parallel.tp=2", "parallel.sp=false"],
        2,
        "MoE with parallel.tp=2 requires sequence parallel",
    ),
    (
        ["parallel.tp=2", "parallel.sp=true", "model.add_bias_linear=true"],
        2,
        "does not support linear biases",
    ),
    (
        ["parallel.tp=2", "parallel.sp=true", "trainer.seq_length=63"],
        2,
        "seq_length=63 is not divisible by parallel.tp=2 under sequence parallel",
    ),
    (["parallel.cp=2", "trainer.seq_length=66"], 2, "seq_length=66 is not divisible by 2 x cp = 4"),
    (
        ["parallel=tp2", "parallel.cp=2", "trainer.seq_length=68"],
        4,
        "not divisible by 2 x cp x tp (sequence parallel) = 8",
    ),
    (
        [
            "stage=stage4_omni_sft_16k",
            "model=tiny",
            "parallel.cp=2",
            "data.packing.sample_pad_multiple=6",
        ],
        4,
        "sample_pad_multiple=6 is not CP-compatible padding",
    ),
    (["parallel.cp=8", "trainer.seq_length=64"], 8, "Mamba heads per TP rank do not split"),
    (
        [
            "stage=stage4_omni_sft_16k",
            "model=tiny",
            "parallel=single",
            "parallel.ep=2",
            "parallel.moe_token_dispatcher=allgather",
        ],
        2,
        "data.packing.pad_to_capacity=true",
    ),
    (
        ["stage=stage4_omni_sft_16k", "model=tiny", "data.packing.sample_pad_multiple=24"],
        2,
        "seq_length=1024 is not a multiple of data.packing.sample_pad_multiple=24",
    ),
    (
        [
            "parallel.cp=4",
            "trainer.seq_length=64",
            "model.mamba_num_groups=3",
            "model.mamba_num_heads=12",
        ],
        4,
        "one must divide the other",
    ),
    (
        ["model.hybrid_pattern=M-ME", "parallel.cp=2", "trainer.seq_length=64"],
        2,
        "parallel.cp=2 but the layer pattern has no attention layer",
    ),
    (["trainer.global_batch_size=6"], 4, "global_batch_size=6 is not divisible by"),
    (["parallel.tp=2", "parallel.sp=true", "parallel.etp=1"], 2, "parallel.etp=1 differs"),
    (["parallel.sp=true"], 1, "parallel.sp=true needs parallel.tp > 1"),
    (["parallel.tp=4", "parallel.sp=true"], 4, "num_query_groups=2 is not divisible"),
    (["checkpoint.resume=true", "checkpoint.init_from=/x"], 1, "are exclusive"),
    (
        ["model.hybrid_pattern=*-*-", "model.num_moe_experts=0", "parallel.ep=2"],
        2,
        "no MoE layer",
    ),
    (
        ["stage=stage4_omni_sft_16k", "model=tiny", "parallel.cp=2", "answers=learn"],
        4,
        "trainer.eval_answers.num_samples=72 needs parallel.cp=1 and parallel.pp=1",
    ),
    (
        ["trainer.eval_answers.num_samples=8"],
        1,
        "num_samples=8 on data.kind='synthetic': synthetic token sequences have no",
    ),
    (
        ["trainer.eval_answers.num_samples=8", "trainer.eval_answers.data=/nonexistent/x.jsonl"],
        1,
        "trainer.eval_answers.data=/nonexistent/x.jsonl does not exist",
    ),
]


@pytest.mark.parametrize(("overrides", "world", "message"), INVALID)
def test_invalid_layout_raises_specific_error(overrides, world, message):
    cfg = compose_job(overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world)


PER_FIELD = [
    ("model.hybrid_pattern=*X", "unknown symbols"),
    ("model.num_query_groups=3", "multiple of model.num_query_groups=3"),
    ("model.moe_router_topk=9", "exceeds model.num_moe_experts"),
    ("parallel.pp=2", "pipeline parallelism is not supported"),
    ("parallel.moe_token_dispatcher=flex", "moe_token_dispatcher='flex'"),
    ("optimizer.min_lr=1.0", "min_lr=1.0 must lie in"),
    ("optimizer.warmup_fraction=1.5", "warmup_fraction=1.5"),
    ("trainer.precision=fp16", "precision='fp16'"),
    ("trainer.micro_batch_size=0", "micro_batch_size must be > 0"),
    ("checkpoint.resume=maybe", "checkpoint.resume='maybe'"),
    ("data.kind=webdataset", "data.kind='webdataset'; valid: synthetic, energon"),
    ("data.kind=energon", "data.kind=energon needs exactly one of data.blend"),
    ("data.max_skip_fraction=1.5", "data.max_skip_fraction=1.5 must be in"),
    ("data.video_fps=0", "data.video_fps must be > 0"),
    ("data.packing.plan_cache_mib=-1", "data.packing.plan_cache_mib=-1 must be >= 0"),
    ("data.blend_temperature=0", "data.blend_temperature=0.0 must be > 0"),
    ("trainer.eval_answers.num_samples=-1", "num_samples=-1 must be >= 0"),
    ("trainer.eval_answers.metrics=[bleu]", "unknown .'bleu'.; choose from loss, exact"),
    ("trainer.eval_answers.max_new_tokens=0", "max_new_tokens must be > 0"),
]


@pytest.mark.parametrize(("override", "message"), PER_FIELD)
def test_per_field_errors(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        compose_job([override])


def test_misspelt_key_is_one_line_value_error():
    with pytest.raises(
        ValueError,
        match=r"unknown config key 'trainer.seq_lenth': trainer has no field 'seq_lenth'; did "
        r"you mean trainer.seq_length\? \('omni-train config' prints every field\)",
    ):
        compose_job(["trainer.seq_lenth=3"])


def test_cli_rejects_bad_layout_before_launching():
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train", "run", "--nproc-per-node", "3", "parallel=tp2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "world size 3 is not divisible by tp x cp x pp" in proc.stderr
    assert "torch.distributed" not in proc.stderr  # never got as far as torchrun


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.mamba_num_groups=1", "model.mamba_num_groups=1 is not divisible by parallel.tp=2"),
        ("model.vision.num_attention_heads=1", "model.vision.num_attention_heads=1"),
        ("model.audio_projector_ffn_hidden_size=63", "model.audio_projector_ffn_hidden_size=63"),
    ],
)
def test_tensor_parallel_dimensions_of_every_component_are_checked(override, message):
    cfg = compose_job(["parallel=tp2", override])
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        validate(cfg, 2)
