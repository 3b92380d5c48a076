"""Cross-field checks, run on the composed config before any process group or model exists.

Each check raises ``ValueError`` with one line that says what is wrong and how to fix it.
Split by topic; :func:`validate` runs them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from omni_train.config import blends  # OmegaConf only: cheap
from omni_train.config.peft import GROUP_COMPONENTS
from omni_train.config.schema import JobConfig

if TYPE_CHECKING:  # the config layer stays free of torch imports
    from omni_train.platform.capabilities import Platform


def check_layout(cfg: JobConfig, world_size: int) -> None:
    """World size against the model-parallel sizes."""
    p = cfg.parallel
    model_parallel = p.tp * p.cp * p.pp
    if world_size % model_parallel:
        raise ValueError(
            f"world size {world_size} is not divisible by tp x cp x pp = {p.tp} x {p.cp} x {p.pp}"
            f" = {model_parallel}; change the number of processes or parallel.tp/parallel.cp"
        )
    if world_size % (p.ep * p.expert_tp * p.pp):
        raise ValueError(
            f"world size {world_size} is not divisible by ep x etp = {p.ep} x {p.expert_tp}; "
            "change parallel.ep or parallel.etp"
        )
    if cfg.model.num_query_groups % p.tp:
        raise ValueError(
            f"model.num_query_groups={cfg.model.num_query_groups} is not divisible by "
            f"parallel.tp={p.tp}; use a tp that divides it"
        )
    check_tp_divides(cfg)
    if "*" not in cfg.model.hybrid_pattern and p.cp > 1:
        raise ValueError(
            f"parallel.cp={p.cp} but the layer pattern has no attention layer; set parallel.cp=1"
        )


def check_tp_divides(cfg: JobConfig) -> None:
    """Every tensor-parallel dimension of every component splits evenly over TP ranks."""
    m, tp = cfg.model, cfg.parallel.tp
    dims = {"model.num_attention_heads": m.num_attention_heads}
    if "M" in m.hybrid_pattern:
        dims |= {"model.mamba_num_heads": m.mamba_num_heads}
        dims |= {"model.mamba_num_groups": m.mamba_num_groups}
    if m.vision is not None:
        dims |= {"model.vision.num_attention_heads": m.vision.num_attention_heads}
        dims |= {"model.vision.ffn_hidden_size": m.vision.ffn_hidden_size}
        dims |= {"model.vision_projector_ffn_hidden_size": m.vision_projector_ffn_hidden_size}
    if m.audio is not None:
        dims |= {"model.audio_projector_ffn_hidden_size": m.audio_projector_ffn_hidden_size}
    for name, value in dims.items():
        if value % tp:
            raise ValueError(
                f"{name}={value} is not divisible by parallel.tp={tp}; use a tp that divides it"
            )


def check_moe(cfg: JobConfig) -> None:
    m, p = cfg.model, cfg.parallel
    if "E" not in m.hybrid_pattern:
        if p.ep > 1:
            raise ValueError(f"parallel.ep={p.ep} but the model has no MoE layer; set ep=1")
        return
    if m.num_moe_experts % p.ep:
        raise ValueError(
            f"parallel.ep={p.ep} does not divide model.num_moe_experts={m.num_moe_experts}; "
            "choose an ep that divides the expert count"
        )
    if p.tp > 1 and not p.sp:
        raise ValueError(
            f"MoE with parallel.tp={p.tp} requires sequence parallelism; set parallel.sp=true"
        )
    if p.ep == 1 and p.expert_tp != p.tp:
        # megatron-core marks expert weights for expert-group reduction only when ep > 1; with
        # ep=1 and etp < tp the TP ranks' expert replicas would never sum their gradients.
        raise ValueError(
            f"parallel.etp={p.expert_tp} differs from parallel.tp={p.tp} with parallel.ep=1; "
            "set parallel.etp equal to tp (or leave it unset), or use ep > 1"
        )
    if p.tp > 1 and m.add_bias_linear:
        raise ValueError(
            "MoE with parallel.tp > 1 does not support linear biases; "
            "set model.add_bias_linear=false"
        )
    pk = cfg.data.packing
    fixed_length = cfg.data.kind != "energon" or (pk.enabled and pk.pad_to_capacity)
    if p.ep > 1 and p.moe_token_dispatcher == "allgather" and not fixed_length:
        raise ValueError(
            f"parallel.moe_token_dispatcher=allgather with parallel.ep={p.ep}: the allgather "
            "dispatcher gathers equal-sized token blocks from the expert-parallel ranks, but "
            "energon micro-batches differ in length per rank; use the alltoall dispatcher, or "
            "packing with data.packing.pad_to_capacity=true (every sequence seq_length tokens)"
        )


def check_sequence(cfg: JobConfig) -> None:
    p, seq = cfg.parallel, cfg.trainer.seq_length
    if p.sp and p.tp == 1:
        raise ValueError("parallel.sp=true needs parallel.tp > 1; set sp=false or raise tp")
    if p.sp and seq % p.tp:
        raise ValueError(
            f"trainer.seq_length={seq} is not divisible by parallel.tp={p.tp} under sequence "
            f"parallelism; use a multiple of {p.tp}"
        )
    if p.cp > 1:
        check_context_parallel(cfg)


def check_context_parallel(cfg: JobConfig) -> None:
    """CP > 1: padding the load-balanced split can cut, and a model CP can split."""
    p, m, seq = cfg.parallel, cfg.model, cfg.trainer.seq_length
    tp_sp = p.tp if p.sp else 1
    need = 2 * p.cp * tp_sp
    what = f"2 x cp{' x tp (sequence parallel)' if p.sp else ''} = {need}"
    if seq % need:
        raise ValueError(
            f"trainer.seq_length={seq} is not divisible by {what}: context parallel cuts every "
            f"sequence into 2 x cp load-balanced chunks; use a multiple of {need}"
        )
    pk = cfg.data.packing
    if pk.enabled and pk.sample_pad_multiple is not None and pk.sample_pad_multiple % need:
        raise ValueError(
            f"data.packing.sample_pad_multiple={pk.sample_pad_multiple} is not CP-compatible "
            f"padding: parallel.cp={p.cp} splits every packed sample into 2 x cp chunks, so "
            f"samples must be padded to a multiple of {what}; set it to a multiple of {need} "
            "(or leave it unset to derive it)"
        )
    if "M" in m.hybrid_pattern:
        # megatron-core's Mamba CP: an all-to-all from sequence- to head-parallel.
        heads, groups = m.mamba_num_heads // p.tp, m.mamba_num_groups // p.tp
        if heads % p.cp:
            raise ValueError(
                f"model.mamba_num_heads={m.mamba_num_heads} / tp {p.tp} = {heads} Mamba heads "
                f"per TP rank do not split over parallel.cp={p.cp} (Mamba context parallel "
                "shards heads); use a cp that divides them"
            )
        if groups % p.cp and p.cp % groups:
            raise ValueError(
                f"model.mamba_num_groups={m.mamba_num_groups} / tp {p.tp} = {groups} groups per "
                f"TP rank and parallel.cp={p.cp}: one must divide the other (Mamba context "
                "parallel shards or replicates groups); choose cp accordingly"
            )


def check_batch(cfg: JobConfig, world_size: int) -> None:
    t = cfg.trainer
    dp = cfg.parallel.data_parallel_size(world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
            f"micro_batch_size x dp = {t.micro_batch_size} x {dp}; "
            f"use a multiple of {t.micro_batch_size * dp}"
        )


def check_packing(cfg: JobConfig) -> None:
    pk, t = cfg.data.packing, cfg.trainer
    if not pk.enabled:
        return
    if cfg.data.kind != "energon":
        raise ValueError(
            "data.packing.enabled=true packs conversations read by energon; set data.kind=energon"
            " (synthetic token sequences are already full length)"
        )
    if t.micro_batch_size != 1:
        raise ValueError(
            f"trainer.micro_batch_size={t.micro_batch_size} with data.packing.enabled: a packed "
            "micro-batch is one THD sequence of trainer.seq_length tokens; set "
            "trainer.micro_batch_size=1 (global_batch_size counts packed sequences)"
        )
    if pk.sample_pad_multiple is not None and t.seq_length % pk.sample_pad_multiple:
        raise ValueError(
            f"trainer.seq_length={t.seq_length} is not a multiple of "
            f"data.packing.sample_pad_multiple={pk.sample_pad_multiple}: a sample that fits "
            "would not fit once padded; choose a pad multiple that divides the context"
        )


def check_checkpoint(cfg: JobConfig) -> None:
    c = cfg.checkpoint
    if c.resume == "true" and (c.init_from or c.init_components):
        raise ValueError(
            "checkpoint.resume=true and checkpoint.init_from/init_components are exclusive: "
            "resume continues this stage, init_* starts it from other weights; pick one"
        )
    if c.init_from and c.init_components:
        raise ValueError(
            "checkpoint.init_from (a whole previous-stage checkpoint) and "
            "checkpoint.init_components (per-component pretrained weights, stage 0) are "
            "exclusive; set one"
        )
    _check_components_declared(cfg, "checkpoint.init_components", c.init_components)


def _check_components_declared(cfg: JobConfig, field: str, names) -> None:
    m = cfg.model
    unknown = sorted(set(names) - set(m.components))
    if unknown:
        raise ValueError(
            f"{field} names {unknown}, which model={m.name} does not declare; "
            f"valid: {', '.join(m.components)}"
        )


def check_stage(cfg: JobConfig) -> None:
    """The freezing policy and eval parts name only what the model declares."""
    s, m = cfg.stage, cfg.model
    _check_components_declared(cfg, "stage.trainable", s.trainable)
    if not s.trainable:
        raise ValueError("stage.trainable is empty: nothing would train; name a component")
    unknown = sorted(set(s.eval_parts) - set(m.parts))
    if unknown:
        raise ValueError(
            f"stage.eval_parts names {unknown}; model={m.name} declares: "
            f"{', '.join(m.parts) or 'none'}"
        )


def check_recompute(cfg: JobConfig) -> None:
    r, m = cfg.recompute, cfg.model
    for flag, present, component in (
        (r.vision_encoder, m.vision is not None, "vision_encoder"),
        (r.audio_encoder, m.audio is not None, "audio_encoder"),
    ):
        if flag and not present:
            raise ValueError(
                f"recompute.{component}=true but model={m.name} has no {component}; set "
                f"recompute.{component}=false"
            )
    if "moe" in r.lm and "E" not in m.hybrid_pattern:
        raise ValueError(
            f"recompute.lm includes 'moe' but model={m.name} has no MoE layer; remove it"
        )


def check_cluster(cfg: JobConfig, world_size: int) -> None:
    c = cfg.cluster
    if c.world_size is not None and c.world_size != world_size:
        raise ValueError(
            f"stage {cfg.stage.name} is laid out for cluster {c.name}: {c.nodes} nodes x "
            f"{c.gpus_per_node} GPUs = {c.world_size} ranks, but this job has {world_size}; "
            f"launch on {c.nodes} nodes, or set cluster.nodes (and check that "
            "trainer.global_batch_size still divides by the data-parallel size)"
        )


def check_data(cfg: JobConfig) -> None:
    """The blend resolves and every local dataset folder exists (energon data only)."""
    d = cfg.data
    if d.kind != "energon":
        return

    if d.path is not None:
        dirs = [d.path]
    else:
        if d.blend not in blends.available_blends():
            raise ValueError(
                f"data.blend={d.blend!r} is not in {blends.BLENDS_DIR}; valid: "
                f"{', '.join(blends.available_blends())}"
            )
        dirs = blends.stage_dataset_dirs(d.blend, d.paths, d.synthetic_root, None)
    hint = (
        f"; create it with: omni-train data synth --out {d.synthetic_root}"
        if d.synthetic_root
        else ""
    )
    for path in dirs:
        if "://" not in path and not Path(path).exists():
            raise ValueError(f"dataset {path} (data.blend={d.blend}) does not exist{hint}")
        _check_splits(Path(path), cfg)
    if cfg.model.vision is None and cfg.model.audio is None:
        raise ValueError(
            f"data.kind=energon feeds conversations with media, but model={cfg.model.name} has "
            "neither model.vision nor model.audio; use an omni model or data.kind=synthetic"
        )


def _check_splits(path: Path, cfg: JobConfig) -> None:
    """A prepared dataset has training shards, and validation shards when the stage
    evaluates (energon would fail later, inside the loader)."""
    split_file = path / ".nv-meta" / "split.yaml"
    if not split_file.is_file():
        if path.is_dir():
            raise ValueError(
                f"dataset {path} is not prepared for energon (no .nv-meta/split.yaml); run "
                "omni-train data convert, or energon prepare on it"
            )
        return  # a metadataset file: energon checks its entries
    import yaml

    parts = (yaml.safe_load(split_file.read_text()) or {}).get("split_parts", {})
    if not parts.get("train"):
        raise ValueError(f"dataset {path} has no 'train' shards ({split_file})")
    split = cfg.data.eval_split
    if cfg.trainer.eval_iters > 0 and not parts.get(split):
        raise ValueError(
            f"dataset {path} has no {split!r} shards but trainer.eval_iters="
            f"{cfg.trainer.eval_iters}; set trainer.eval_iters=0 or prepare a {split!r} split"
        )


def check_answers(cfg: JobConfig, files: bool = True) -> None:
    """``trainer.eval_answers``: generation runs the whole model in every process, without
    context or pipeline parallelism, on conversations."""
    a = cfg.trainer.eval_answers
    if a.num_samples == 0:
        return
    p = cfg.parallel
    if p.cp > 1 or p.pp > 1:
        raise ValueError(
            f"trainer.eval_answers.num_samples={a.num_samples} needs parallel.cp=1 and "
            f"parallel.pp=1 (got cp={p.cp}, pp={p.pp}): megatron's static Mamba decode has no "
            "context parallelism; set trainer.eval_answers.num_samples=0 and run omni-train "
            "eval on the stage's checkpoint with TP / EP instead"
        )
    if a.data is None and cfg.data.kind != "energon":
        raise ValueError(
            f"trainer.eval_answers.num_samples={a.num_samples} on data.kind={cfg.data.kind!r}: "
            "synthetic token sequences have no conversations to answer; set "
            "trainer.eval_answers.data=FILE.jsonl|DATASET or num_samples=0"
        )
    if files and a.data is not None and "://" not in a.data and not Path(a.data).exists():
        raise ValueError(f"trainer.eval_answers.data={a.data} does not exist")


def check_peft(cfg: JobConfig) -> None:
    """A LoRA target group inside a component the stage keeps frozen would train a tower the
    stage means to keep as it is (patterns are checked when the model is built)."""
    if not cfg.peft.enabled:
        return
    trainable = set(cfg.stage.trainable)
    for group in cfg.peft.targets:
        frozen = [c for c in GROUP_COMPONENTS[group] if c not in trainable]
        if frozen:
            raise ValueError(
                f"peft.targets={group} adapts {', '.join(frozen)}, which stage.trainable="
                f"{list(cfg.stage.trainable)} keeps frozen; add it to stage.trainable (its "
                "adapters then train, its base weights stay frozen) or drop the group"
            )


def check_platform(cfg: JobConfig, platform: Platform) -> None:
    """What the chosen building blocks can run; called once each rank knows its platform
    (``omni_train.platform.setup``), before the model is built."""
    # The ViT always packs its images (THD); synthetic token data has no images for it.
    vision_runs = cfg.model.vision is not None and cfg.data.kind != "synthetic"
    thd = cfg.data.packing.enabled or vision_runs
    if platform.attention == "te" and cfg.trainer.precision == "fp32" and thd:
        raise ValueError(
            "trainer.precision=fp32 with packed (THD) sequences: Transformer Engine has no fp32 "
            "attention backend for packed input (flash and cuDNN attention take bf16/fp16); "
            "set trainer.precision=bf16 (the GPU smoke stage smoke_omni_gpu does), or "
            "data.packing.enabled=false for a text-only model"
        )


def validate(cfg: JobConfig, world_size: int, *, data: bool = True) -> None:
    """All cross-field checks for a job on ``world_size`` processes. ``data=False`` skips the
    dataset checks (the dry run resolves a layout on a machine without the data)."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    check_cluster(cfg, world_size)
    check_layout(cfg, world_size)
    check_moe(cfg)
    check_sequence(cfg)
    check_batch(cfg, world_size)
    check_checkpoint(cfg)
    check_packing(cfg)
    check_stage(cfg)
    check_recompute(cfg)
    check_answers(cfg, files=data)
    check_peft(cfg)
    if data:
        check_data(cfg)  # after the config-only checks: it reads the filesystem
