"""``omni-train``: the command-line front door.

omni-train run [--nproc-per-node N] stage=smoke model=tiny [overrides]
    launches ``torchrun -m omni_train.train`` with the same overrides (same code path); on
    several nodes, the same command on each with ``--nnodes N --rdzv-endpoint HOST:PORT``;
omni-train run --dry-run stage=stage6_omni_sft_256k [--rank R] [--json]
    resolves the stage's full-scale layout in one CPU process (fake process groups, meta
    device): group sizes and per-rank parameter, gradient and optimizer memory;
omni-train plan stage=stage6_omni_sft_256k [overrides] [--json] [--mfu 0.3]
    per-rank peak memory of the stage at full scale (weights, gradients, optimizer, measured
    activations by component, buffers), the verdict against cluster.gpu_memory_gib, the
    smallest change that makes a failing stage fit, step time and GPU-hours;
omni-train curriculum [--nproc-per-node 2] [--name N] [--from STAGE] [--plan] [overrides]
    runs every stage in order into runs/<name>/stage<k>_<name>/, each from the previous
    stage's weights (default model=tiny: the CPU overlay, data parallel: parallel=dp);
    completed stages are skipped; on learnability data it adds answers=learn, so every stage
    scores its answers at its end, and the summary shows the accuracy per task after each;
omni-train config [overrides]
    prints the composed, validated config as YAML.
omni-train model summary model=NAME [--json]
    parameters per component, total and active per token (meta device, no weight memory).
omni-train data synth --out DIR --samples N --seed S [--flavour learn [--learn-media noise]]
    writes one energon dataset per synthetic category (every modality, real encoded media);
    the learn flavour: the learnability tasks (answers only the media tell), real/noise/none;
omni-train probe CHECKPOINT --data ROOT [--json OUT] [overrides]
    answer accuracy per learnability task on ROOT's held-out samples (one process; omni-train
    eval's teacher-forced loss and exact match, grouped by task);
omni-train generate CKPT --data FILE.jsonl --media DIR --out answers.jsonl [--max-new-tokens N]
        [--temperature T] [--top-p P] [--top-k K] [--seed S] [--batch-size B]
        [--nproc-per-node N] [overrides]
    an answer per JSONL row (its conversation up to the last assistant turn is the prompt):
    greedy or sampled, ending at the end of turn, with megatron-core's inference cache; on N
    processes of any TP / EP layout (every rank answers the same rows);
omni-train eval CKPT --data FILE.jsonl|DATASET_DIR [--media DIR] [--metrics loss,exact,generate,wer]
        [--max-new-tokens N] [--batch-size B] [--json OUT] [--nproc-per-node N] [overrides]
    per data source and category (a JSONL file's rows, or a converted dataset's val split):
    teacher-forced loss and exact match on the last assistant turn, greedy generation exact
    match (normalised text), WER / CER on transcription rows; rows it cannot read are counted
    by reason; a table, and JSON with every row;
omni-train data convert FILE.jsonl --media DIR --out DIR
    turns JSONL conversations plus a media folder into a prepared energon dataset.
omni-train data tokenizer --out DIR
    rebuilds the tiny test tokenizer that ships with omni-train.
omni-train report RUN_DIR
    PNG plots (loss per modality and eval loss against tokens, throughput, memory) and an HTML
    page with the summary table, for a stage's output folder or a curriculum folder;
omni-train checkpoint import-hf HF_DIR|FILE.nemo --out DIR [--dtype D] [model=NAME ...]
    a released checkpoint (the omni model, its LM, RADIO, Parakeet) -> torch_dist, for
    checkpoint.init_from (any layout) or checkpoint.init_components.<component> (stage 0);
omni-train checkpoint import-hf ADAPTER_DIR --base CKPT --out DIR
    a PEFT LoRA folder (export-hf's HF_DIR/adapter) -> an adapter checkpoint on CKPT;
omni-train checkpoint export-hf CKPT --out HF_DIR [--copy-processor-from DIR] [--dtype D]
    [--merge]
    a stage checkpoint (any layout) -> config.json + safetensors that transformers loads; a
    LoRA stage's: its adapters merged (--merge), or as a PEFT folder in HF_DIR/adapter;
omni-train checkpoint compare-hf HF_DIR CKPT --data FILE.jsonl --media DIR [--json]
    the reference model and omni-train's on the same samples: logit and loss differences.

omni-train --verbose COMMAND ... (or COMMAND ... --verbose)
    also the library lines omni-train filters (omni_train/log.py, QUIET) and torchrun's own
    output, which otherwise goes to <output_dir>/logs/torchrun.log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from omni_train.config import compose_job, to_dict, validate
from omni_train.datatools import prepare
from omni_train.inference.layout import generation_parallel
from omni_train.inference.metrics import METRICS, parse_metrics
from omni_train.lifecycle import EXIT_INTERRUPTED
from omni_train.log import VERBOSE_ENV, install_filters
from omni_train.stage import curriculum
from omni_train.stage.launch import QUIET_MODULE, Rendezvous, launch_job, torchrun
from omni_train.stage.report import summary_table, write_report


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.dry_run:
        return _dry_run(args, overrides)
    rendezvous = Rendezvous(
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
        endpoint=args.rdzv_endpoint or None,
        run_id=args.rdzv_id,
    )
    # One verdict per job, not per node. c10d numbers the nodes only once torchrun runs, so
    # there Slurm's node id stands in (a job started by hand prints it on every node).
    node = args.node_rank if args.node_rank is not None else int(os.environ.get("SLURM_NODEID", 0))
    if not args.no_plan and node == 0:
        _print_verdict(overrides)
    # Pre-flight here, in one process, before torchrun starts N of them (a bad config, an
    # unwritable or full output folder, a folder another run holds, a refused resume/handoff).
    return launch_job(overrides, args.nproc_per_node, rendezvous)


def _print_verdict(overrides: list[str]) -> None:
    """The planner's one-line verdict before a launch on a cluster whose GPU memory is known
    (about 30 s of CPU on the launching host; ``--no-plan`` skips it). It informs, it does
    not stop the launch: the activation model is an estimate."""
    if compose_job(overrides).cluster.gpu_memory_gib is None:
        return
    done = _cpu_tool("omni_train.plan.planner", [*overrides, "--verdict"], capture=True)
    verdict = [line for line in done.stdout.splitlines() if line.startswith("plan: ")]
    if done.returncode == 0 and verdict:  # (libraries may print to stdout as they import)
        print(verdict[-1], flush=True)
    else:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"plan: not available: {last}", flush=True)


def _cpu_tool(module: str, args: list[str], capture: bool = False):
    """``python -m module args`` in a fresh process on the CPU platform (CUDA hidden): the
    inspection tools need no GPU, and a GPU host must not select the GPU path for a fake
    512-rank world or a meta-device model."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMNI_TRAIN_PLATFORM="cpu")
    cmd = [sys.executable, *QUIET_MODULE, module, *args]
    if capture:
        return subprocess.run(cmd, env=env, capture_output=True, text=True)
    return subprocess.call(cmd, env=env)


def _dry_run(args: argparse.Namespace, overrides: list[str]) -> int:
    compose_job(overrides)  # a bad override fails here with one line
    cmd = [*overrides, f"--world-size={args.nproc_per_node * args.nnodes}", f"--rank={args.rank}"]
    return _cpu_tool("omni_train.plan.dry_run", cmd + (["--json"] if args.json else []))


def _plan(args: argparse.Namespace, overrides: list[str]) -> int:
    compose_job(overrides)  # a bad override fails here with one line
    return _cpu_tool("omni_train.plan.planner", [*overrides, *args.plan_args])


def _curriculum(args: argparse.Namespace, overrides: list[str]) -> int:
    overrides = curriculum.with_defaults(overrides)
    model = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "model")
    run_dir = Path(args.runs_dir) / (args.name or model)
    if args.plan:
        for s in curriculum.plan(run_dir, overrides, args.nproc_per_node, args.from_stage):
            print(f"{s.action:7s} {s.name:34s} {' '.join(s.overrides)}")
        return 0
    try:
        manifests = curriculum.run(run_dir, overrides, args.nproc_per_node, args.from_stage)
    except curriculum.CurriculumInterruptedError as e:
        print(f"omni-train curriculum: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except curriculum.CurriculumStageError as e:  # the stage's summary is printed above it
        print(f"omni-train curriculum: {e}", file=sys.stderr)
        return 1
    print(summary_table(manifests))
    return 0


def _config(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = compose_job(overrides)
    if args.world_size:
        validate(cfg, args.world_size)
    print(OmegaConf.to_yaml(to_dict(cfg)), end="")
    return 0


def _model(args: argparse.Namespace, overrides: list[str]) -> int:
    compose_job(overrides)  # a bad config fails here with one line
    # shapes are identical on both platforms: the summary builds on the CPU one
    return _cpu_tool("omni_train.plan.summary", overrides + (["--json"] if args.json else []))


def _data(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.action == "show":
        return _data_show(args, overrides)
    if overrides:
        raise ValueError(f"omni-train data {args.action} takes no overrides, got {overrides}")
    if args.out is None:
        raise ValueError(f"omni-train data {args.action} needs --out DIR")
    if args.action == "synth":
        counts = prepare.synthesize(
            args.out, args.samples, args.seed, overwrite=args.overwrite, flavour=args.flavour,
            media=args.learn_media,
        )  # fmt: skip
        print(f"wrote {sum(counts.values())} samples in {len(counts)} datasets under {args.out}")
    elif args.action == "convert":
        # lazy: the converter imports torch (~1.3 s), which the light commands never need
        from omni_train.datatools.convert import convert

        if not args.jsonl:
            raise ValueError("data convert needs FILE (.jsonl, .json or .parquet)")
        counts = convert(
            args.jsonl,
            args.media,
            args.out,
            val_fraction=args.val_fraction,
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
            workers=args.workers,
            asr_prompt=args.asr_prompt,
        )
        skipped = counts["skipped"]
        print(
            f"{args.out}: {counts['converted']} converted ({counts['train']} train, "
            f"{counts['val']} val), {sum(skipped.values())} skipped"
            + (f" {skipped}" if skipped else "")
        )
    else:
        # lazy: the tokenizer module imports torch (~1.3 s)
        from omni_train.data.tokenizer import build_tiny_tokenizer

        print(build_tiny_tokenizer(args.out))
    return 0


def _data_show(args: argparse.Namespace, overrides: list[str]) -> int:
    """What the model sees of each sample; config overrides pick the model, stage, layout and
    tokenizer (e.g. ``model=nano_omni_30b_a3b data.layout=report``)."""
    if not args.jsonl or not args.media:
        raise ValueError("data show needs FILE.jsonl and --media DIR")
    # lazy: `data show` reads through the energon loader: megatron-core (~4 s)
    from omni_train.datatools.show import format_text, show

    records, skipped = show(args.jsonl, args.media, compose_job(overrides))
    if args.json:
        print(json.dumps({"samples": records, "skipped": dict(skipped)}))
    else:
        print(format_text(records, skipped))
    return 0


def _run_tool(nproc: int, target: list[str]) -> int:
    """A tool under torchrun, its output on this console; a failure ends with its own error
    line (``omni_train.quiet`` prints it) and status 2, without this process's traceback."""
    try:
        torchrun(nproc, *target, timeout=None, capture=False)
    except RuntimeError:
        return 2
    return 0


def _probe(args: argparse.Namespace, overrides: list[str]) -> int:
    compose_job(overrides)  # a bad override fails here with one line
    extra = ["--json", args.json] if args.json else []
    target = [*QUIET_MODULE, "omni_train.stage.probe", args.checkpoint, "--data", args.data, *extra]
    return _run_tool(1, [*target, *overrides])  # a free port, one process


def _generate(args: argparse.Namespace, overrides: list[str]) -> int:
    # a bad override or layout fails here with one line, before any process starts
    generation_parallel(compose_job(overrides).parallel)
    options = ["--data", args.data, "--media", args.media, "--out", args.out]
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "batch_size"):
        options += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    target = [*QUIET_MODULE, "omni_train.inference.generate", args.checkpoint, *options]
    return _run_tool(args.nproc_per_node, [*target, *overrides])


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    # a bad override, layout or metric fails here with one line, before any process starts
    generation_parallel(compose_job(overrides).parallel)
    parse_metrics(args.metrics)
    options = ["--data", args.data, "--metrics", args.metrics]
    options += ["--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
    options += ["--media", args.media] if args.media else []
    options += ["--json", args.json] if args.json else []
    target = [*QUIET_MODULE, "omni_train.inference.evaluate", args.checkpoint, *options]
    return _run_tool(args.nproc_per_node, [*target, *overrides])


def _report(args: argparse.Namespace, overrides: list[str]) -> int:
    if overrides:
        raise ValueError(f"omni-train report takes no overrides, got {overrides}")
    print(write_report(args.run_dir, args.out))
    return 0


def _checkpoint(args: argparse.Namespace, overrides: list[str]) -> int:
    # Conversion runs on the CPU platform in this process (a world of one); hiding CUDA keeps
    # a GPU host from selecting the GPU path.
    os.environ.setdefault("OMNI_TRAIN_PLATFORM", "cpu")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # lazy: the conversion builds models: megatron-core (~4 s)
    from omni_train.hf import convert

    if args.action == "import-hf" and (Path(args.source) / "adapter_config.json").is_file():
        # lazy: as convert
        from omni_train.hf import adapters

        if not args.base or overrides:
            raise ValueError(
                f"{args.source} is a PEFT adapter folder: import it with --base CKPT (the "
                "omni-train checkpoint of the model it adapts, e.g. the base's import-hf), "
                "no overrides"
            )
        report = adapters.import_adapter(Path(args.source), Path(args.base), Path(args.out))
        print(f"imported {report.source} (LoRA adapters on {args.base}) -> {args.out}: "
              f"{report.tensors} tensors; {'; '.join(report.notes)}")  # fmt: skip
        return 0
    if args.action == "import-hf":
        report = convert.import_hf(args.source, args.out, overrides, dtype=args.dtype or "source")
        print(
            f"imported {report.source} ({report.source_kind}: {', '.join(report.components)}) "
            f"-> {args.out}: {report.tensors} tensors, {report.bytes / 2**30:.2f} GiB, "
            f"{report.seconds:.1f} s"
        )
        for note in report.notes:
            print(f"note: {note}")
        return 0
    if overrides and args.action == "export-hf":
        raise ValueError(f"checkpoint export-hf takes no overrides, got {overrides}")
    if args.action == "export-hf":
        # lazy: as convert
        from omni_train.hf import export

        report = export.export_hf(
            args.source,
            args.out,
            copy_processor_from=args.copy_processor_from,
            dtype=args.dtype,
            merge=args.merge,
        )
        print(
            f"exported {report.checkpoint} -> {report.out}: {report.tensors} tensors, "
            f"{report.bytes / 2**30:.2f} GiB in {len(report.files)} files, {report.seconds:.1f} s"
        )
        return 0
    # lazy: the comparison builds models: megatron-core (~4 s)
    from omni_train.hf import compare

    if not args.target or not args.data or not args.media:
        raise ValueError("checkpoint compare-hf needs HF_DIR CKPT --data FILE.jsonl --media DIR")
    return compare.main(
        args.source, args.target, args.data, args.media, as_json=args.json, overrides=overrides
    )


class _Subparsers:
    """``add_subparsers()``'s object, each subcommand given the options every command takes."""

    def __init__(self, action, common: argparse.ArgumentParser):
        self.action, self.common = action, common

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.action.add_parser(name, parents=[self.common], **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="omni-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbose_help = "show every library warning and torchrun's own output"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    # also after the command; SUPPRESS: a subcommand's default must not undo the global flag
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose_help)  # fmt: skip
    sub = _Subparsers(parser.add_subparsers(dest="command", required=True), common)
    run = sub.add_parser("run", help="run one stage (launches torchrun)")
    run.add_argument("--nproc-per-node", type=int, default=1)
    run.add_argument("--nnodes", type=int, default=1)
    run.add_argument(
        "--rdzv-endpoint",
        default="",
        help="c10d rendezvous (nnodes > 1; the same command on every node): HOST[:PORT] of one "
        "of the nodes, port 29400 if left out",
    )
    run.add_argument(
        "--rdzv-id",
        default=None,
        help="with --rdzv-endpoint: the job's id, the same on every node (default "
        "$SLURM_JOB_ID, else 'omni-train')",
    )
    run.add_argument("--node-rank", type=int, default=None, help="this node (static rendezvous)")
    run.add_argument("--master-addr", default=None, help="with --node-rank: node 0's address")
    run.add_argument("--master-port", type=int, default=None, help="with --node-rank (29500)")
    run.add_argument(
        "--dry-run", action="store_true", help="resolve the layout and memory; launch nothing"
    )
    run.add_argument("--rank", type=int, default=0, help="dry run: the rank to report")
    run.add_argument("--json", action="store_true", help="dry run: machine-readable output")
    run.add_argument(
        "--no-plan", action="store_true", help="skip the planner's verdict before launching"
    )
    run.set_defaults(func=_run)
    plan = sub.add_parser(
        "plan",
        help="per-rank memory (activations included), verdict, smallest fix, time",
        description="Options: --json, --verdict, and the planner's assumptions: --mfu, "
        "--mamba-kernel {mamba_ssm,torch}, --cuda-context-gib, --comm-buffers-gib, "
        "--fragmentation, --patches-per-image.",
    )
    plan.set_defaults(func=_plan)
    cur = sub.add_parser("curriculum", help="run every stage in order (launches torchrun)")
    cur.add_argument("--nproc-per-node", type=int, default=2)
    cur.add_argument("--name", default="", help="run name: runs/<name>/ (default: the model)")
    cur.add_argument("--runs-dir", default="runs")
    cur.add_argument("--from", dest="from_stage", help="re-run from this stage (name or index)")
    cur.add_argument("--plan", action="store_true", help="print what would run, run nothing")
    cur.set_defaults(func=_curriculum)
    show = sub.add_parser("config", help="print the composed config")
    show.add_argument("--world-size", type=int, default=0, help="also validate for this size")
    show.set_defaults(func=_config)
    model = sub.add_parser("model", help="inspect a model config")
    model.add_argument("action", choices=["summary"])
    model.add_argument("--json", action="store_true", help="machine-readable output")
    model.set_defaults(func=_model)
    data = sub.add_parser(
        "data",
        help="make, convert or show datasets (show takes config overrides: model=, data.layout=)",
    )
    data.add_argument("action", choices=["synth", "convert", "show", "tokenizer"])
    data.add_argument(
        "jsonl",
        nargs="?",
        help="convert: a .jsonl, .json or .parquet file (omni-train, LLaVA/ShareGPT, OpenAI "
        "messages, NeMo manifest or ASR rows); show: a JSONL file",
    )
    data.add_argument("--out", help="synth/convert/tokenizer: output folder")
    data.add_argument("--json", action="store_true", help="show: machine-readable output")
    data.add_argument("--samples", type=int, default=64, help="synth: samples per category")
    data.add_argument("--seed", type=int, default=0, help="synth: random seed")
    data.add_argument(
        "--flavour", default="general", choices=["general", "learn"],
        help="synth: general conversations, or the learnability tasks (answers only the media "
        "tell; omni_train/datatools/learn_tasks.py)",
    )  # fmt: skip
    data.add_argument(
        "--learn-media", default="real", choices=["real", "noise", "none"],
        help="synth --flavour learn: the media as drawn, replaced by noise, or left out",
    )  # fmt: skip
    data.add_argument(
        "--media", help="convert/show: folder the JSONL's media paths are relative to"
    )
    data.add_argument("--val-fraction", type=float, default=0.02, help="convert: val share")
    data.add_argument("--samples-per-shard", type=int, default=1000, help="convert")
    data.add_argument("--workers", type=int, default=1, help="convert: processes converting rows")
    data.add_argument(
        "--asr-prompt", default="Transcribe the audio.", help="convert: the user turn of ASR rows"
    )
    data.add_argument(
        "--overwrite",
        action="store_true",
        help="synth/convert: replace an existing omni-train dataset at --out (never another "
        "folder)",
    )
    data.set_defaults(func=_data)
    probe = sub.add_parser(
        "probe", help="answer accuracy per learnability task of a stage's weights (1 process)"
    )
    probe.add_argument("checkpoint", help="a stage's output folder or one of its checkpoints")
    probe.add_argument("--data", required=True, help="a `data synth --flavour learn` root")
    probe.add_argument("--json", default=None, help="also write the results here")
    probe.set_defaults(func=_probe)
    gen = sub.add_parser(
        "generate", help="answers of a checkpoint for every row of a JSONL file (torchrun)"
    )
    gen.add_argument("checkpoint", help="a stage's output folder or one of its checkpoints")
    gen.add_argument("--data", required=True, help="FILE.jsonl (the data convert format)")
    gen.add_argument("--media", required=True, help="folder the JSONL's media paths are in")
    gen.add_argument("--out", required=True, help="answers.jsonl to write (one line per row)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (the same on all ranks)")
    gen.add_argument("--batch-size", type=int, default=8, help="rows decoded together")
    gen.add_argument("--nproc-per-node", type=int, default=1)
    gen.set_defaults(func=_generate)
    ev = sub.add_parser(
        "eval", help="loss, exact match and WER / CER of a checkpoint per source and category"
    )
    ev.add_argument("checkpoint", help="a stage's output folder or one of its checkpoints")
    ev.add_argument("--data", required=True, help="FILE.jsonl or a converted dataset folder")
    ev.add_argument("--media", default=None, help="the JSONL's media folder (default: its own)")
    ev.add_argument("--metrics", default=",".join(METRICS), help="a comma list of these")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", default=None, help="write the results and every row here")
    ev.add_argument("--nproc-per-node", type=int, default=1)
    ev.set_defaults(func=_eval)
    report = sub.add_parser("report", help="plots and an HTML summary of a stage or curriculum")
    report.add_argument("run_dir", help="a stage's output folder or a curriculum folder")
    report.add_argument("--out", default=None, help="where to write (default RUN_DIR/report)")
    report.set_defaults(func=_report)
    ckpt = sub.add_parser("checkpoint", help="import / export / compare Hugging Face checkpoints")
    ckpt.add_argument("action", choices=["import-hf", "export-hf", "compare-hf"])
    ckpt.add_argument("source", help="import: HF folder or .nemo; export: CKPT; compare: HF folder")
    ckpt.add_argument("target", nargs="?", help="compare-hf: the omni-train checkpoint")
    ckpt.add_argument("--out", help="import-hf / export-hf: the new folder")
    ckpt.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], help="convert float tensors")
    ckpt.add_argument("--copy-processor-from", help="export-hf: tokenizer/processor files")
    ckpt.add_argument(
        "--base", help="import-hf of a PEFT adapter folder: the checkpoint of the model it adapts"
    )
    ckpt.add_argument(
        "--merge",
        action="store_true",
        help="export-hf of a LoRA checkpoint: its adapters merged into the weights (what vLLM "
        "serves); without it, the weights without them and a PEFT folder in HF_DIR/adapter",
    )
    ckpt.add_argument("--data", help="compare-hf: samples (the data convert JSONL format)")
    ckpt.add_argument("--media", help="compare-hf: folder the JSONL's media paths are in")
    ckpt.add_argument("--json", action="store_true", help="compare-hf: machine-readable output")
    ckpt.set_defaults(func=_checkpoint)
    args, overrides = parser.parse_known_args(argv)
    if args.verbose:  # for this process and every one it starts: tools, torchrun, the ranks
        os.environ[VERBOSE_ENV] = "1"
    install_filters()  # before any command imports megatron or NeMo, which warn as they import
    if args.command == "plan":  # the planner parses its own options (overrides hold a '=')
        options = [o for o in overrides if o.startswith("-") or "=" not in o]
        args.plan_args, overrides = options, [o for o in overrides if o not in options]
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {bad}; overrides look like key=value")
    if args.command == "checkpoint" and args.action != "compare-hf" and not args.out:
        parser.error(f"checkpoint {args.action} needs --out DIR")
    try:
        return args.func(args, overrides)
    except ValueError as e:
        print(f"omni-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
