"""The seven stage recipes against the curriculum table, the tiny overlay, the stage/recompute/
cluster checks, the handoff checks and the curriculum plan (no processes launched here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omni_train.config import compose_job, config_hash, to_dict, validate
from omni_train.config.blends import synthetic_paths
from omni_train.stage import curriculum, report
from omni_train.stage.handoff import check_handoff

ALL = ["llm", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector"]
NO_AUDIO = ["llm", "vision_encoder", "vision_projector"]
RECOMPUTE_LM = ["core_attn", "mlp", "layernorm", "moe"]
# ../shared/spec/curriculum.md, one row per line (None: '-' in the table).
TABLE = {
    "name": ["vision projector warmup", "vision SFT 16k", "audio projector warmup",
             "audio projector + encoder", "omni SFT 16k", "omni SFT 48k", "omni SFT 256k"],
    "context": [16384, 16384, 16384, 16384, 16384, 49152, 262144],
    "max_video_frames": [None, 64, None, None, 64, 256, 256],
    "global_batch": [128, 256, 512, 512, 256, 128, 128],
    "cp": [1, 1, 1, 1, 1, 2, 16],
    "peak_lr": [1e-3, 5e-5, 1e-3, 2.5e-5, 1e-5, 1e-5, 1e-6],
    "min_lr": [1e-5, 0, 1e-5, 0, 1e-7, 1e-7, 0],
    "warmup": [0.1, 0.01, 0.1, 0.1, 0.1, 0.1, 0.1],
    "weight_decay": [0.01, 0.05, 0.01, 0.05, 0.05, 0.05, 0.05],
    "trainable": [["vision_projector"], NO_AUDIO, ["audio_projector"],
                  ["audio_encoder", "audio_projector"], ALL, ALL, NO_AUDIO],
    "nodes": [32, 64, 128, 128, 64, 64, 64],
    "tokens": [15.5e9, 214.8e9, 11.4e9, 100.5e9, 57.3e9, 33.5e9, 34.0e9],
}  # fmt: skip
NAMES = [
    "stage0_vision_projector_warmup",
    "stage1_vision_sft_16k",
    "stage2_audio_projector_warmup",
    "stage3_audio_encoder",
    "stage4_omni_sft_16k",
    "stage5_omni_sft_48k",
    "stage6_omni_sft_256k",
]


@pytest.fixture(scope="module")
def full():
    return [compose_job([f"stage={n}"]) for n in NAMES]


@pytest.fixture(scope="module")
def tiny():
    return [compose_job([f"stage={n}", "model=tiny"]) for n in NAMES]


def test_curriculum_order_is_the_seven_stages():
    assert curriculum.stage_names(["model=tiny"]) == NAMES


@pytest.mark.parametrize("k", range(7))
def test_recipe_matches_every_row_of_the_table(full, k):
    cfg = full[k]
    row = {key: values[k] for key, values in TABLE.items()}
    assert (cfg.stage.name, cfg.stage.index, cfg.stage.description) == (NAMES[k], k, row["name"])
    assert cfg.stage.previous == (NAMES[k - 1] if k else None)
    assert cfg.trainer.seq_length == row["context"]
    assert cfg.trainer.global_batch_size == row["global_batch"]
    assert cfg.parallel.cp == row["cp"]
    assert cfg.optimizer.lr == row["peak_lr"] and cfg.optimizer.min_lr == row["min_lr"]
    assert cfg.optimizer.warmup_fraction == row["warmup"]
    assert cfg.optimizer.weight_decay == row["weight_decay"]
    assert sorted(cfg.stage.trainable) == sorted(row["trainable"])
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node) == (row["nodes"], 8)
    # the published tokens at full packing
    assert cfg.trainer.train_steps == round(row["tokens"] / (row["global_batch"] * row["context"]))
    if row["max_video_frames"] is None:  # '-': the blend holds no video at all
        mapped = synthetic_paths(f"stage{k}", "/x").values()
        categories = {p for v in mapped for p in (v if isinstance(v, list) else [v])}
        assert not categories & {"/x/video", "/x/audio_video"}, categories
    else:
        assert cfg.data.max_video_frames == row["max_video_frames"]
    # common to all stages
    assert cfg.model.name == "nano_omni_30b_a3b"
    p = cfg.parallel
    assert (p.tp, p.sp, p.ep, p.expert_tp, p.distributed_optimizer) == (2, True, 32, 2, True)
    o = cfg.optimizer
    assert (o.name, o.beta1, o.beta2, o.decay_style) == ("adamw", 0.9, 0.999, "cosine")
    assert cfg.trainer.precision == "bf16" and cfg.trainer.micro_batch_size == 1
    assert cfg.data.kind == "energon" and cfg.data.blend == f"stage{k}"
    assert cfg.data.packing.enabled and cfg.data.packing.balance == "global"
    # memory settings: LM selective + ViT full everywhere, audio from 4, projectors from 5
    r = cfg.recompute
    assert (r.lm, r.vision_encoder) == (RECOMPUTE_LM, True)
    assert (r.audio_encoder, r.projectors) == (k >= 4, k >= 5)
    assert cfg.stage.eval_parts == (["vision_encoder.cpe"] if k in (1, 4, 5) else [])


@pytest.mark.parametrize("k", range(7))
def test_tiny_overlay_scales_context_and_batch_and_keeps_the_rest(full, tiny, k):
    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    a, b = flat(to_dict(full[k])), flat(to_dict(tiny[k]))
    changed = {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}
    allowed = {
        "trainer.seq_length",
        "trainer.global_batch_size",
        "trainer.train_steps",
        "trainer.log_interval",
        "trainer.save_interval",
        "trainer.eval_iters",
        "trainer.precision",
        "parallel.ep",
        "parallel.cp",
        "cluster.name",
        "cluster.nodes",
        "cluster.gpu",
        "data.synthetic_root",
        "data.synthetic_flavour",
        "optimizer.lr_scale",
        "data.blend_temperature",
        "data.num_workers",
        "data.packing.buffer_size",
    }
    assert {key for key in changed if not key.startswith("model.")} <= allowed
    assert tiny[k].model.name == "tiny"
    # context / 16; stage 6 / 64 (CPU attention is dense over a packed sequence)
    assert tiny[k].trainer.seq_length * (64 if k == 6 else 16) == full[k].trainer.seq_length
    assert tiny[k].trainer.global_batch_size * 64 == full[k].trainer.global_batch_size
    for key in ("optimizer.lr", "optimizer.min_lr", "stage.trainable", "recompute.projectors"):
        assert key not in changed


@pytest.mark.parametrize("k", range(7))
def test_full_scale_stage_validates_on_its_cluster(full, k):
    """Every check but the data one (dataset paths are the user's: data.paths.*)."""
    cfg = full[k]
    world = cfg.cluster.nodes * 8
    validate(cfg, world, data=False)
    with pytest.raises(ValueError, match=f"laid out for cluster h100_{cfg.cluster.nodes}n"):
        validate(cfg, world // 2, data=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.trainable=[llm,speech]", r"stage.trainable names \['speech'\]"),
        ("stage.trainable=[]", "nothing would train"),
        ("stage.eval_parts=[audio_encoder.cpe]", "stage.eval_parts names"),
        ("+checkpoint.init_components.vision=/x", r"init_components names \['vision'\]"),
        ("recompute.lm=[core_attn,ffn]", r"unknown modules \['ffn'\]"),
    ],
)
def test_bad_stage_settings_fail_before_anything_runs(override, message, synth_root):
    # the data exists: the data check (which runs first) passes and the stage check speaks
    data = f"data.synthetic_root={synth_root}"
    with pytest.raises(ValueError, match=message):
        validate(compose_job(["stage=stage1_vision_sft_16k", "model=tiny", data, override]), 2)


def test_recompute_of_a_missing_encoder_is_an_error():
    cfg = compose_job(["stage=smoke", "recompute=all", "model.audio=null"])
    with pytest.raises(ValueError, match="recompute.audio_encoder=true but model=tiny has no"):
        validate(cfg, 1)


# ---- handoff ---------------------------------------------------------------------------------


def fake_run(path: Path, cfg, *, status="completed", step=None) -> Path:
    """A stage output_dir as the runner leaves it (manifest, checkpoints/latest, a step folder
    with its integrity record)."""
    from omni_train.checkpoint import integrity

    step = cfg.trainer.train_steps if step is None else step
    ckpt = path / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text("{}")
    (ckpt / ".metadata").write_bytes(b"torch_dist")
    names = integrity.files_of(ckpt)
    integrity.write_record(ckpt, integrity.digest_files(ckpt, names, "head_tail"), "head_tail")
    (path / "checkpoints" / "latest").write_text(ckpt.name)
    manifest = {
        "stage": cfg.stage.name,
        "status": status,
        "step": step,
        "train_steps": cfg.trainer.train_steps,
        "config_hash": config_hash(cfg),
        "model_fingerprint": config_hash(cfg, sections=("model",)),
        "model": to_dict(cfg)["model"],
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def tiny_stage(k: int, *extra: str):
    return compose_job([f"stage={NAMES[k]}", "model=tiny", *extra])


def test_handoff_accepts_the_completed_previous_stage(tmp_path):
    run = fake_run(tmp_path / "s0", tiny_stage(0))
    assert check_handoff(tiny_stage(1, f"checkpoint.init_from={run}")).name == "step_0000040"


@pytest.mark.parametrize(
    ("source", "kwargs", "extra", "message"),
    [
        (2, {}, [], "starts from stage stage0_vision_projector_warmup, but"),
        (0, {"status": "interrupted", "step": 3}, [], r"is interrupted \(step 3/40\); finish"),
        (0, {}, ["model.hidden_size=128"], r"another model .*model.hidden_size: 64 -> 128"),
    ],
)
def test_handoff_refuses(tmp_path, source, kwargs, extra, message):
    run = fake_run(tmp_path / "src", tiny_stage(source), **kwargs)
    with pytest.raises(ValueError, match=message):
        check_handoff(tiny_stage(1, f"checkpoint.init_from={run}", *extra))


def test_handoff_refuses_an_intermediate_checkpoint(tmp_path):
    run = fake_run(tmp_path / "s0", tiny_stage(0))
    early = run / "checkpoints" / "step_0000003"
    early.mkdir()
    (early / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="is not the final checkpoint"):
        check_handoff(tiny_stage(1, f"checkpoint.init_from={early}"))
    unchecked = tiny_stage(1, f"checkpoint.init_from={early}", "checkpoint.check_handoff=false")
    assert check_handoff(unchecked) == early


# ---- the curriculum plan --------------------------------------------------------------------


def test_plan_skips_completed_stages_and_resumes_interrupted_ones(tmp_path, synth_root):
    overrides = ["model=tiny", f"data.synthetic_root={synth_root}"]
    first = curriculum.plan(tmp_path, overrides, 2)
    assert [s.action for s in first] == ["run"] * 7
    assert first[3].overrides[-1] == f"checkpoint.init_from={tmp_path / NAMES[2]}"
    for stage in first[:2]:
        fake_run(stage.output_dir, stage.cfg)
    fake_run(first[2].output_dir, first[2].cfg, status="interrupted", step=2)
    again = curriculum.plan(tmp_path, overrides, 2)
    assert [s.action for s in again] == ["skip", "skip", "resume"] + ["run"] * 4
    redo = curriculum.plan(tmp_path, overrides, 2, from_stage="1")
    assert [s.action for s in redo] == ["skip", "rerun", "rerun"] + ["run"] * 4
    with pytest.raises(ValueError, match="completed with a different config"):
        curriculum.plan(tmp_path, [*overrides, "optimizer.clip_grad=0.5"], 2)
    with pytest.raises(ValueError, match="--from 'stage9' is not a curriculum stage"):
        curriculum.plan(tmp_path, overrides, 2, from_stage="stage9")


def test_summary_table_has_a_row_per_stage():
    m = {
        "stage": NAMES[0],
        "step": 6,
        "train_steps": 6,
        "tokens": 12345,
        "final_loss": 6.2,
        "eval_loss": None,
        "trainable_parameters": 24704,
        "job_time_s": 25.6,
        "curriculum_action": "run",
    }
    lines = report.summary_table([m, {**m, "stage": NAMES[1]}]).splitlines()
    assert lines[0].split()[:3] == ["stage", "action", "steps"]
    assert len(lines) == 4 and "12,345" in lines[2] and "24,704" in lines[3]


def test_the_curriculum_scores_answers_only_on_learnability_data(tmp_path, capsys):
    from omni_train.datatools import prepare
    from omni_train.stage.curriculum import ANSWERS, with_answers

    first = "stage0_vision_projector_warmup"
    # the tiny overlay's learn root, still to be made: every stage scores its answers
    assert with_answers(["model=tiny"], first) == ["model=tiny", ANSWERS]
    assert (
        compose_job([f"stage={first}", "model=tiny", ANSWERS]).trainer.eval_answers.num_samples
        == 72
    )
    # a root of general synthetic data: no tasks to score, said once
    general = tmp_path / "general"
    prepare.synthesize(general, 2, 0)
    plain = ["model=tiny", f"data.synthetic_root={general}"]
    assert with_answers(plain, first) == plain
    assert "holds no learnability tasks" in capsys.readouterr().out
    # the published stages (no synthetic root) and an explicit choice are left alone
    assert with_answers([], first) == []
    assert with_answers(["model=tiny", "answers=null"], first) == ["model=tiny", "answers=null"]


def test_the_tiny_curriculum_runs_data_parallel_unless_told():
    from omni_train.stage.curriculum import with_defaults

    assert with_defaults([]) == ["model=tiny", "parallel=dp"]
    assert with_defaults(["parallel=tp2"]) == ["model=tiny", "parallel=tp2"]
    assert with_defaults(["model=tiny", "parallel.tp=2"]) == ["model=tiny", "parallel.tp=2"]
    assert with_defaults(["model=nano_omni_30b_a3b"]) == ["model=nano_omni_30b_a3b"]
    p = compose_job(["stage=stage4_omni_sft_16k", *with_defaults([])]).parallel
    assert (p.tp, p.sp, p.cp, p.ep, p.distributed_optimizer) == (1, False, 1, 1, True)
    # a layout chosen by group still wins over the overlay (which sets only ep and cp)
    assert compose_job(["stage=stage4_omni_sft_16k", "model=tiny", "parallel=tp2"]).parallel.tp == 2
