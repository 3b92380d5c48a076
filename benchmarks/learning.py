"""Does the tiny omni model learn to read its media? (CPU, `make learn`)

    .venv/bin/python benchmarks/learning.py [--steps N] [--prior-steps 200]
        [--runs real,noise,text_only]
        [--tasks image_colour,...] [--out benchmarks/results/learning_cpu.md]

Trains the tiny omni model (``stage=learn``: every component trainable) on the learnability
tasks (``omni_train/datatools/learn_tasks.py``: colour and shape of an image, bars on a page,
direction of a moving square, pitch of a tone, order of two tones in a clip's soundtrack), once
per run, through the real stack (``omni-train run``: energon, packing, encoders, projectors,
splice), then scores each run's final weights on the held-out, class-balanced questions with
``omni-train probe`` (teacher-forced argmax over the answer span). Runs:

- ``real``: the media as drawn, one process;
- ``noise``: the same questions and answers, every image, frame and waveform replaced by noise
  of the same size (the same token counts): only the answers' prior is left to learn;
- ``text_only``: the same questions without any media (the prior, with no media tokens).
  Every held-out question of a task is then the same input, so its answer is the prior by
  construction (chance on the class-balanced set) however long it trains: it trains
  ``--prior-steps`` (200; its answer loss has settled at the prior's by then), not ``--steps``;
- ``real_tp2``, ``real_cp2``: ``real`` on 2 processes with TP 2 + SP, and with CP 2;
- ``real_lora``, ``noise_lora``: ``real`` and ``noise`` training LoRA adapters (``peft=lora``,
  rank 16) on the LM's and both encoders' linears, the projectors whole, no base weight of the
  LM or the encoders (``LORA``), starting from the ``text_only`` run's weights: a base that
  knows the questions and the answers' prior but has never seen media (LoRA adapts a trained
  model; from the random tiny model the adapters did not even learn the prior: loss 5.0 at
  step 600 against 0.1 for the full fine-tune). ``make learn-lora``.

The runs train side by side (``--jobs``, default 3: every single-process run at once), each
rank on one thread: a run is too small to keep two cores busy (measured on 2 cores, steps
50-100 of ``stage=learn``: 0.78 s a step alone on two threads, 1.05 s a step each for two runs
at once on one thread each, 1.5x the throughput). The media variants' data are made in
parallel processes too. ``--jobs 1`` runs them one after the other, each on all cores. The
thread count changes the order of fp32 sums and with it the step at which a task leaves its
prior (at 3e-3, the real run's audio loss at steps 401-500: 0.47 on 1 thread, 0.36 on 2):
compare runs made with the same ``--jobs``.

Targets (issues #20, #38): per task, ``real`` and ``real_lora`` >= 90 % answer accuracy and
``noise`` / ``noise_lora`` / ``text_only`` <= chance + 10 points; ``real_tp2`` / ``real_cp2``
within 5 points of ``real``. Writes a markdown
table (with a verdict per target), a loss-curve PNG and the figures as JSON beside it; exits
3 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from omni_train.config.compose import compose_job
from omni_train.datatools import prepare
from omni_train.datatools.learn_tasks import TASKS
from omni_train.stage.launch import launch_stage, torchrun

# LoRA on the LM and both encoders (their base weights frozen), the projectors trained whole,
# at the stage's rate (1e-3 -> 1e-4). At 5x that, LoRA's usual higher rate, nothing left the
# prior (learning_explore/lora_lr_5e-3); at 1000 steps five tasks reached 85-100 % and
# audio_video_order stayed at chance (learning_explore/lora_lr_1e-3): make learn-lora trains
# 1500 (--steps).
LORA = [
    "peft=lora",
    "peft.targets=[lm_attention,lm_mamba,lm_experts,lm_shared_expert,lm_mlp,vision_blocks,"
    "audio_blocks]",
]
# the run whose final weights a run starts from (checkpoint.init_from), where there is one
BASE = {"real_lora": "text_only", "noise_lora": "text_only"}
# run -> (media, processes, parallel recipe, its own overrides)
RUNS = {
    "real": ("real", 1, "single", []),
    "noise": ("noise", 1, "single", []),
    "text_only": ("none", 1, "single", []),
    "real_tp2": ("real", 2, "tp2", []),
    "real_cp2": ("real", 2, "cp2", []),
    "real_lora": ("real", 1, "single", LORA),
    "noise_lora": ("noise", 1, "single", LORA),
}
DEFAULT_RUNS = ("real", "noise", "text_only")
REAL_TARGET = 0.90
CONTROL_MARGIN = 0.10
LAYOUT_TOLERANCE = 0.05
STAGE = ["stage=learn", "model=tiny"]
MISSED = 3  # the exit status when a target is missed (a crash exits 1)


def make_data(work: Path, media: str, samples: int, seed: int, tasks: list[str] | None) -> Path:
    root = work / "data" / media
    tasks = tasks or list(TASKS)  # only the task folders (no general text / multi-image)
    prepare.synthesize(root, samples, seed, flavour="learn", media=media, tasks=tasks,
                       overwrite=True)  # fmt: skip
    return root


def train_and_probe(
    work: Path, run: str, root: Path, steps: int, extra: list[str], threads: int
) -> tuple[dict, dict, float]:
    """(manifest, probe results, wall seconds) of one fresh run, ``threads`` per rank. Runs in
    a worker process of its own (``main``), so setting the environment here is safe."""
    _, nproc, layout, own = RUNS[run]
    extra = [*own, *extra]
    out = work / run
    shutil.rmtree(out, ignore_errors=True)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    manifest = launch_stage(
        nproc, out, *STAGE, f"parallel={layout}", f"data.path={root / prepare.LEARN_METADATASET}",
        f"trainer.train_steps={steps}", *extra, timeout=3600,
    )  # fmt: skip
    wall = time.perf_counter() - started
    if manifest.get("status") != "completed":
        raise RuntimeError(f"run {run} did not complete: {manifest.get('status')}")
    result = out / "probe.json"
    torchrun(1, "-m", "omni_train.stage.probe", str(out), "--data", str(root), "--json",
             str(result), *STAGE, *extra)  # fmt: skip
    return manifest, json.loads(result.read_text()), wall


def verdicts(results: dict[str, dict]) -> list[tuple[str, str, bool]]:
    """(task, target, met) for every target the runs at hand can check: ``real`` reaches 90 %,
    the controls stay within chance + 10 points, the parallel layouts within 5 points of
    ``real`` (the same data and steps; fp32 sums in another order, so not bit-identical)."""
    out = []
    first = next(iter(results))
    for task in results[first]:
        chance = results[first][task]["chance"]
        base = results.get("real", results[first])[task]["accuracy"]
        for run, r in results.items():
            acc = r[task]["accuracy"]
            if run in ("real", "real_lora"):
                out.append((task, f"{run} >= {REAL_TARGET:.0%}: {acc:.1%}", acc >= REAL_TARGET))
            elif run.startswith("real_"):
                same = abs(acc - base) <= LAYOUT_TOLERANCE
                out.append((task, f"{run} within 5 points of real ({base:.1%}): {acc:.1%}", same))
            else:
                limit = chance + CONTROL_MARGIN
                out.append((task, f"{run} <= chance + 10 ({limit:.1%}): {acc:.1%}", acc <= limit))
    return out


def table(results: dict[str, dict]) -> str:
    runs = list(results)
    head = ["task", "classes", "chance", *[f"{r} acc" for r in runs], *[f"{r} loss" for r in runs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, real in next(iter(results.values())).items():
        cells = [task, str(len(TASKS[task].classes)), f"{real['chance']:.1%}"]
        cells += [f"{results[r][task]['accuracy']:.1%}" for r in runs]
        cells += [f"{results[r][task]['loss']:.3f}" for r in runs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MODALITIES = ("image", "video", "audio", "audio+video")  # the manifests' train/loss/<modality>


def parameters_table(manifests: dict[str, dict]) -> str:
    """Per run: the parameters it trained (adapters apart) and its training time per step
    (the manifest's, start-up and scoring left out; runs side by side share the cores)."""
    lines = ["| run | trainable parameters | of which LoRA adapters | frozen | s / step |",
             "|---|---|---|---|---|"]  # fmt: skip
    for run, m in manifests.items():
        adapters = sum(c.get("adapter", 0) for c in m["parameters"].values())
        per_step = m["wall_time_s"] / m["step"]
        lines.append(f"| {run} | {m['trainable_parameters']:,} | {adapters:,} | "
                     f"{m['frozen_parameters']:,} | {per_step:.2f} |")  # fmt: skip
    return "\n".join(lines)


def loss_table(manifests: dict[str, dict], every: int = 100) -> str:
    """Per run, each modality's mean training loss over every ``every`` steps: when a run
    left each task's prior (a plateau, then a drop within ~50 steps), which the final
    accuracies alone do not show. Runs without media (``text_only``) have no such losses."""
    keys = {f"train/loss/{m}" for m in MODALITIES}
    runs = [r for r, m in manifests.items() if any(keys & row.keys() for row in m["metrics"])]
    head = ["steps", *[f"{r}: {' / '.join(MODALITIES)}" for r in runs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = max(row["step"] for r in runs for row in manifests[r]["metrics"])
    for end in range(every, last + every, every):
        cells = [f"{end - every + 1}-{min(end, last)}"]
        for run in runs:
            rows = [r for r in manifests[run]["metrics"] if end - every < r["step"] <= end]
            means = []
            for modality in MODALITIES:
                vals = [r[f"train/loss/{modality}"] for r in rows if f"train/loss/{modality}" in r]
                means.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
            cells.append(" / ".join(means))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(manifests: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run, m in manifests.items():
        steps = [row["step"] for row in m["metrics"]]
        axes[0].plot(steps, [row["train/loss"] for row in m["metrics"]], label=run, lw=1)
    axes[0].set(xlabel="step", ylabel="train loss (answer + end-of-turn tokens)", yscale="log",
                title="all tasks")  # fmt: skip
    for run in ("real", "noise", "real_lora", "noise_lora"):
        if run not in manifests:
            continue
        rows = manifests[run]["metrics"]
        for modality in MODALITIES:
            key = f"train/loss/{modality}"
            pts = [(row["step"], row[key]) for row in rows if key in row]
            if pts:
                style = "-" if run.startswith("real") else ":"
                axes[1].plot(*zip(*pts, strict=True), style, lw=1, label=f"{run} {modality}")
    axes[1].set(xlabel="step", ylabel="train loss", yscale="log", title="per modality")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps of the real runs (default: the stage's trainer.train_steps)",
    )
    parser.add_argument("--prior-steps", type=int, default=200, help="steps of text_only")
    parser.add_argument("--samples", type=int, default=1000, help="train samples per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help=f"of {', '.join(RUNS)}")
    parser.add_argument("--tasks", default=None, help="a subset of the tasks (default: all)")
    parser.add_argument("--jobs", type=int, default=3, help="runs that train at once")
    parser.add_argument("--work", type=Path, default=Path("runs/learn"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/learning_cpu.md"))
    parser.add_argument("overrides", nargs="*", help="more config overrides for every run")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if not {"real", "real_lora"} & set(runs) or set(runs) - set(RUNS):
        parser.error(f"--runs must include real or real_lora and be among {', '.join(RUNS)}")
    if {"real_tp2", "real_cp2"} & set(runs) and "real" not in runs:
        parser.error("real_tp2 and real_cp2 are compared with real: add it to --runs")
    missing = sorted({BASE[r] for r in runs if r in BASE} - set(runs))
    if missing:
        parser.error(f"the LoRA runs start from {missing}: add it to --runs")
    if args.steps is None:  # one source for the default: recipes/stage/learn.yaml
        try:
            args.steps = compose_job([*STAGE, *args.overrides]).trainer.train_steps
        except ValueError as e:  # a bad override: say so before any data is made
            parser.error(str(e))
    if min(args.jobs, args.steps, args.prior_steps) < 1:
        parser.error("--jobs, --steps and --prior-steps must be at least 1")
    steps = {r: min(args.steps, args.prior_steps) if r == "text_only" else args.steps for r in runs}
    tasks = args.tasks.split(",") if args.tasks else None
    cores = os.cpu_count() or 2
    started = time.perf_counter()
    medias = list(dict.fromkeys(RUNS[r][0] for r in runs))
    with ProcessPoolExecutor(min(len(medias), cores)) as pool:
        made = {m: pool.submit(make_data, args.work, m, args.samples, args.seed, tasks)
                for m in medias}  # fmt: skip
        roots = {m: f.result() for m, f in made.items()}
    data_s = time.perf_counter() - started
    manifests, results, walls = {}, {}, {}
    # Processes, not threads: each worker's launcher forwards stop signals to its own ranks.
    at_once = min(args.jobs, len(runs))
    # the bases first (their runs together), then the runs that start from them
    phases = [[r for r in runs if r in BASE.values()], [r for r in runs if r not in BASE.values()]]
    for phase in (p for p in phases if p):
        with ProcessPoolExecutor(min(at_once, len(phase))) as pool:
            pending = {}
            for run in phase:
                media, nproc, _, _ = RUNS[run]
                # one thread per rank when runs share the cores; alone, its ranks split them
                threads = 1 if min(at_once, len(phase)) > 1 else max(1, cores // nproc)
                extra = list(args.overrides)
                if run in BASE:
                    extra.append(f"checkpoint.init_from={args.work / BASE[run]}")
                job = (args.work, run, roots[media], steps[run], extra, threads)
                pending[pool.submit(train_and_probe, *job)] = run
            for done in as_completed(pending):
                run = pending[done]
                manifests[run], results[run], walls[run] = done.result()
                print(f"{run}: {walls[run]:.0f} s", flush=True)
    manifests, results, walls = ({r: d[r] for r in runs} for d in (manifests, results, walls))
    total = time.perf_counter() - started
    checks = verdicts(results)
    text = table(results)
    print(text)
    for task, target, met in checks:
        print(f"{'ok  ' if met else 'FAIL'} {task}: {target}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(manifests, png)
    command = " ".join(["python benchmarks/learning.py", *sys.argv[1:]])
    lines = [
        "# Learnability: answer accuracy on held-out questions (CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}  ",
        f"Steps per run: {', '.join(f'{r} {n}' for r, n in steps.items())} (`stage=learn`: "
        f"{next(iter(manifests.values()))['tokens']:,} tokens in the {runs[0]} run), "
        f"{args.samples} train samples per task; data {data_s:.0f} s, "
        + ", ".join(f"{r} {w:.0f} s" for r, w in walls.items())
        + f" ({at_once} at a time); {total / 60:.1f} min in all.",
        "",
        "Answer accuracy: the share of held-out samples (class-balanced) whose every answer "
        "token is the argmax of the logits before it, teacher-forced; loss: mean cross-entropy "
        "over answer tokens. `noise`: every image, frame and waveform replaced by noise of the "
        "same size; `text_only`: no media; `real_tp2` / `real_cp2`: trained with TP 2 + SP / "
        "CP 2 on 2 processes (scored at world size 1, the checkpoint resharded); `*_lora`: "
        "LoRA adapters (rank 16) on the LM's and both encoders' linears, the projectors whole "
        "(the adapters merged on load for scoring).",
        "",
        text,
        "",
        parameters_table(manifests),
        "",
        "Targets:",
        "",
        *[f"- {'met' if met else '**missed**'}: {task}, {target}" for task, target, met in checks],
        "",
        f"![loss curves]({png.name})",
        "",
        "Training loss per modality (answer and end-of-turn tokens; image includes the pages), "
        "mean over each 100 steps:",
        "",
        loss_table(manifests),
        "",
        "What the figures mean, and the configurations tried on the way: "
        "[docs/curriculum.md](../../docs/curriculum.md#does-the-tiny-curriculum-learn).",
        "",
    ]
    args.out.write_text("\n".join(lines))
    record = {"runs": results, "wall_s": walls, "steps": steps, "samples": args.samples}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}, {png} and its .json")
    return 0 if all(met for _, _, met in checks) else MISSED


if __name__ == "__main__":
    sys.exit(main())
