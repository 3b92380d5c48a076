"""``omni-train report RUN_DIR``: pictures of a stage or of a whole curriculum, from manifests.

RUN_DIR is a stage's output folder (with ``manifest.json``) or a curriculum folder (one stage
folder per stage). Written into ``RUN_DIR/report/``:

- ``loss.png``: training loss per modality and evaluation loss against tokens trained on
  (a curriculum's stages one after the other, their boundaries marked);
- ``throughput.png``: tokens/s and TFLOP/s per GPU against the step;
- ``memory.png``: memory per step (GPU max allocated, or the CPU resident set);
- ``index.html``: the summary table (one row per stage) and the three pictures.

Reads only the manifests (``metrics``: the scalars every step logged, ``evals``), so it runs
anywhere, after the fact, without torch.distributed.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from omni_train.datatools.learn_tasks import TASKS
from omni_train.training.metrics import MODALITIES


def manifests(run_dir: str | Path) -> list[dict]:
    """The stage manifests of ``run_dir``, in curriculum order."""
    run_dir = Path(run_dir)
    if (run_dir / "manifest.json").is_file():
        return [json.loads((run_dir / "manifest.json").read_text())]
    found = [json.loads(p.read_text()) for p in sorted(run_dir.glob("*/manifest.json"))]
    if not found:
        raise ValueError(f"{run_dir} holds no manifest.json (a stage or a curriculum folder)")
    return sorted(found, key=lambda m: (m.get("stage_index") is None, m.get("stage_index") or 0))


def _series(ms: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(cumulative tokens, value) of ``key`` over the stages' steps; a stage without ``key``
    (a modality it does not train on) leaves a gap (NaN) rather than a line across it."""
    xs, ys, offset = [], [], 0
    for m in ms:
        found = [row for row in m.get("metrics", []) if row.get(key) is not None]
        if not found and ys and not math.isnan(ys[-1]):
            xs.append(offset)
            ys.append(math.nan)
        for row in found:
            xs.append(offset + row.get("data/tokens", 0))
            ys.append(row[key])
        rows = m.get("metrics") or [{}]
        offset += rows[-1].get("data/tokens", 0)
    return xs, ys


def _boundaries(ms: list[dict]) -> list[tuple[float, str]]:
    out, offset = [], 0
    for m in ms:
        rows = m.get("metrics") or [{}]
        out.append((offset, m["stage"]))
        offset += rows[-1].get("data/tokens", 0)
    return out


def _per_step(ms: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys, offset = [], [], 0
    for m in ms:
        for row in m.get("metrics", []):
            if row.get(key) is not None:
                xs.append(offset + row["step"])
                ys.append(row[key])
        offset += m.get("step", 0)
    return xs, ys


def _eval_points(ms: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys, offset = [], [], 0
    for m in ms:
        tokens = {row["step"]: row.get("data/tokens", 0) for row in m.get("metrics", [])}
        for e in m.get("evals", []):
            value = e.get(key)
            if value is not None:
                xs.append(offset + tokens.get(e["step"], 0))
                ys.append(value)
        rows = m.get("metrics") or [{}]
        offset += rows[-1].get("data/tokens", 0)
    return xs, ys


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the pictures and ``index.html``; returns the HTML file."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ms = manifests(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = Path(run_dir).name

    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs, ys = _series(ms, "train/loss")
    ax.plot(xs, ys, color="black", linewidth=1.2, label="train (all)")
    for modality in MODALITIES:
        mx, my = _series(ms, f"train/loss/{modality}")
        if mx:
            ax.plot(mx, my, linewidth=0.8, alpha=0.8, label=f"train {modality}")
    ex, ey = _eval_points(ms, "loss")
    if ex:
        ax.plot(ex, ey, "o", color="crimson", label="eval")
    if len(ms) > 1:
        for x, name in _boundaries(ms):
            ax.axvline(x, color="grey", linewidth=0.5, linestyle=":")
            ax.text(x, ax.get_ylim()[1], f" {name.split('_')[0]}", fontsize=7, va="top")
    ax.set(xlabel="tokens trained on", ylabel="loss", title=f"{title}: loss")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.5))
    sx, sy = _per_step(ms, "throughput/tokens_per_s")
    ax.plot(sx, sy, color="tab:blue", linewidth=1, label="tokens/s")
    ax.set(xlabel="step", ylabel="tokens/s", title=f"{title}: throughput")
    tx, ty = _per_step(ms, "throughput/tflops_per_gpu")
    if tx:
        twin = ax.twinx()
        twin.plot(tx, ty, color="tab:orange", linewidth=1, label="TFLOP/s per GPU")
        twin.set_ylabel("TFLOP/s per GPU (model)")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3))
    mx, my = _per_step(ms, "memory/gib")
    ax.plot(mx, my, color="tab:green", linewidth=1)
    ax.set(xlabel="step", ylabel="GiB", title=f"{title}: memory per rank (max)")
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)

    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "</head><body style='font-family: sans-serif'>"
        f"<h1>{html.escape(title)}</h1><pre>{html.escape(summary_table(ms))}</pre>"
        "<img src='loss.png'><br><img src='throughput.png'><br><img src='memory.png'>"
        "</body></html>\n"
    )
    (out / "index.html").write_text(page)
    return out / "index.html"


def task_answers(answers: dict | None) -> dict[str, dict]:
    """{learnability task: {accuracy, exact, generate_exact, chance, rows}} of a stage's answer
    metrics (``omni_train.inference.evaluate``'s result, whose categories are the tasks'
    names), tasks in :data:`~omni_train.datatools.learn_tasks.TASKS` order. ``accuracy`` is
    the generated answers' exact match where generation ran, else the teacher-forced one."""
    out = {}
    groups = {g["category"]: g for g in (answers or {}).get("groups", [])}
    for task, spec in TASKS.items():
        g = groups.get(task)
        if g is None:
            continue
        accuracy = g.get("generate_exact", g.get("exact"))
        out[task] = {"accuracy": accuracy, "exact": g.get("exact"), "chance": spec.chance,
                     "generate_exact": g.get("generate_exact"), "rows": g["rows"]}  # fmt: skip
    return out


def summary_table(manifests: list[dict]) -> str:
    """One row per stage: steps, tokens, final and eval loss, mean answer accuracy over the
    learnability tasks (stages with answer metrics), trainable parameters, wall time; then, if
    any stage has them, the accuracy per task after each such stage."""
    head = ("stage", "action", "steps", "tokens", "final loss", "eval loss", "answer acc",
            "trainable", "wall s")  # fmt: skip
    rows = [head]
    scored = [(m, task_answers(m.get("answers"))) for m in manifests]
    for m, tasks in scored:
        values = [r["accuracy"] for r in tasks.values() if r["accuracy"] is not None]
        mean = sum(values) / len(values) if values else None
        rows.append(
            (
                m["stage"],
                m.get("curriculum_action", ""),
                f"{m['step']}/{m['train_steps']}",
                f"{m['tokens']:,}",
                f"{m['final_loss']:.4f}" if m.get("final_loss") is not None else "-",
                f"{m['eval_loss']:.4f}" if m.get("eval_loss") is not None else "-",
                f"{mean:.1%}" if mean is not None else "-",
                f"{m['trainable_parameters']:,}",
                f"{m['job_time_s']:.0f}",
            )
        )
    text = _columns(rows, left=2)
    scored = [(m, tasks) for m, tasks in scored if tasks]
    if scored:
        names = [t for t in TASKS if any(t in tasks for _, tasks in scored)]
        per = [("answer accuracy", "chance", *[m["stage"].split("_")[0] for m, _ in scored])]
        for task in names:
            cells = [_pct(tasks.get(task, {}).get("accuracy")) for _, tasks in scored]
            per.append((task, f"{TASKS[task].chance:.1%}", *cells))
        text += "\n\n" + _columns(per, left=1)
        text += "\n" + _forgotten(scored)
    return text


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _forgotten(scored: list[tuple[dict, dict]]) -> str:
    """A line per task a later stage answers worse than its best earlier stage (by more than
    10 points), naming whether that stage's blend holds the task's category: a stage forgets
    what its published blend does not hold."""
    lines = []
    best: dict[str, tuple[float, str]] = {}
    for m, tasks in scored:
        for task, r in tasks.items():
            acc = r["accuracy"]
            if acc is None:
                continue
            if task in best and acc < best[task][0] - 0.10:
                held = TASKS[task].category in _blend_categories(m)
                why = "its blend holds it" if held else "its blend does not hold it"
                lines.append(f"{m['stage']}: {task} {_pct(acc)}, was {_pct(best[task][0])} after "
                             f"{best[task][1]} ({why})")  # fmt: skip
            if task not in best or acc > best[task][0]:
                best[task] = (acc, m["stage"])
    return "\n".join(["forgotten:", *lines]) if lines else "forgotten: nothing"


def _blend_categories(manifest: dict) -> set[str]:
    """The folder names of the datasets a stage trained on: on learnability data, the
    synthetic categories its blend draws from (data_blends/synthetic.yaml)."""
    return {Path(d).name for d in manifest.get("data", {}).get("datasets", [])}


def _columns(rows: list[tuple[str, ...]], left: int) -> str:
    """Aligned columns, the first ``left`` left-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
