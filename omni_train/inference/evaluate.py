"""``omni-train eval``: a checkpoint's metrics per data source and category.

    omni-train eval CKPT --data FILE.jsonl|DATASET_DIR [--media DIR] [--metrics loss,exact,...]
        [--max-new-tokens N] [--batch-size B] [--json OUT] [--nproc-per-node N] [overrides]

Rows: every line of a JSONL file (``omni-train data convert`` formats, media under ``--media``;
source = the file's name), or the ``val`` split of a converted dataset folder (one holding
``.omni-train-dataset.json``; source = its name) or of every such folder directly under
DATASET_DIR (``omni-train data synth``'s root; source = each folder's name). A row's category
is its own ``category`` field, else its ``task`` field (the JSONL row, or the sample's
conversation JSON in a dataset), else the modality mix of its media (``text``, ``image``,
``audio``, ``image+audio``, ...).

The answer is the conversation's **last assistant turn**. Metrics (``--metrics``, a comma list;
all by default):

- ``loss``: teacher-forced cross-entropy per answer token (the sample encoded as training
  encodes it; the answer's tokens without its end-of-turn token), pooled over the group's
  tokens; the probe's scoring (:mod:`omni_train.stage.probe`) on the last assistant turn;
- ``exact``: teacher-forced exact match, the share of rows whose every answer token is the
  argmax of the logits before it;
- ``generate``: generation exact match (:mod:`.generate`'s loop, greedy unless sampling is
  asked for): the normalised generated text equals the normalised reference
  (:mod:`.metrics`);
- ``wer``: WER and CER of the generated text on **transcription rows** (generation runs for
  them): a row whose category contains ``asr`` or ``transcri``, or whose last user turn
  holds audio and no image / video and whose text contains ``transcri`` (``data convert``'s
  ASR rows ask "Transcribe the audio.").

A row that cannot be read or encoded is counted per group under its reason (``failed``), per
metric: it is never dropped silently. Every rank evaluates the same rows in lockstep (as
generate does); rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_train.checkpoint import check_model_fingerprint
from omni_train.config import JobConfig, config_hash
from omni_train.config.blends import stage_dataset_dirs
from omni_train.data.conversation import SampleError, parse_conversation
from omni_train.data.loader import task_encoder, to_device
from omni_train.data.task_encoder import Conversation, cook_raw
from omni_train.datatools.convert import ConvertError
from omni_train.datatools.prepare import STAMP, read_raw
from omni_train.inference import metrics as m
from omni_train.inference.generate import (
    answer_rows,
    generation_config,
    generation_view,
    iter_jsonl,
    loaded_model,
)
from omni_train.inference.layout import without_sequence_parallel
from omni_train.inference.metrics import METRICS, parse_metrics
from omni_train.inference.sampling import SamplingConfig
from omni_train.log import install_filters

_TRANSCRIBE = re.compile(r"asr|transcri", re.IGNORECASE)


@dataclass
class EvalRow:
    source: str
    key: str
    conv: Conversation | None
    category: str = ""
    transcription: bool = False
    error: str | None = None  # "reason: message" when the row could not be read


def _describe(conv: Conversation, named: str) -> tuple[str, bool, str | None]:
    """(category, transcription row?, error) of one conversation."""
    try:
        turns = parse_conversation(conv.conversation, set(conv.members), require_assistant=False)
    except SampleError as e:
        return named or "unreadable", False, str(e)
    kinds = sorted({p.kind for t in turns for p in t.parts if p.kind != "text"})
    category = named or "+".join(kinds) or "text"
    last = max((i for i, t in enumerate(turns) if t.role == "assistant"), default=len(turns))
    user = next((t for t in reversed(turns[:last]) if t.role == "user"), None)
    asked = False
    if user is not None:
        ukinds = {p.kind for p in user.parts}
        text = " ".join(p.text for p in user.parts if p.kind == "text")
        asked = "audio" in ukinds and not ukinds & {"image", "video"}
        asked = asked and bool(_TRANSCRIBE.search(text))
    return category, bool(_TRANSCRIBE.search(named)) or asked, None


def _named(doc: dict) -> str:
    return str(doc.get("category") or doc.get("task") or "")


def _row(source: str, key: str, conv: Conversation, doc: dict) -> EvalRow:
    category, asr, error = _describe(conv, _named(doc))
    return EvalRow(source, key, None if error else conv, category, asr, error)


def read_eval_rows(
    data: str | Path, media_root: str | Path | None, split: str = "val"
) -> list[EvalRow]:
    """The rows of ``data`` (module docstring; a dataset's ``split``) with their source and
    category."""
    data = Path(data)
    rows: list[EvalRow] = []
    if data.is_file():
        if media_root is None:
            media_root = data.parent
        for key, conv, doc in iter_jsonl(data, media_root):
            if isinstance(conv, ConvertError):
                error = f"{conv.reason}: {conv}"
                rows.append(EvalRow(data.name, key, None, "unreadable", error=error))
            else:
                rows.append(_row(data.name, key, conv, doc))
        return rows
    folders = (
        [data]
        if (data / STAMP).is_file()
        else sorted(p for p in data.iterdir() if (p / STAMP).is_file())
    )
    if not folders:
        raise ValueError(f"{data} is neither a JSONL file nor a converted dataset (no {STAMP})")
    for folder in folders:
        for key, members in read_raw(folder, split):
            try:
                doc = json.loads(members["json"])
            except (KeyError, ValueError):
                doc = {}
            rows.append(_row(folder.name, key, cook_raw(key, members, folder.name), doc))
    return rows


def last_answer_mask(labels: torch.Tensor, loss_mask: torch.Tensor, im_end: int) -> torch.Tensor:
    """[b, s] bool: the label positions of each row's last assistant turn (its last run of
    loss-bearing labels), less its end-of-turn token."""
    on = loss_mask > 0
    s = on.shape[1]
    idx = torch.arange(s, device=on.device).expand_as(on)
    last_on = torch.where(on, idx, -1).max(1, keepdim=True).values  # the run's end
    # the run's start: one past the last loss-free position before its end
    before = torch.where(~on & (idx < last_on), idx, -1).max(1, keepdim=True).values
    return on & (idx > before) & (idx <= last_on) & (labels != im_end)


@torch.no_grad()
def teacher_forced(model, encoder, convs: list, device) -> list[dict]:
    """Per conversation: {exact, right, tokens, loss}: whether every answer token is the argmax,
    how many are, how many there are, and their summed loss."""
    batch = to_device(encoder.batch([encoder.encode(c) for c in convs]), device)
    logits = model(
        input_ids=batch.tokens,
        position_ids=batch.position_ids,
        attention_mask=None,
        media=batch.media,
        runtime_gather_output=True,
    ).float()
    mask = last_answer_mask(batch.labels, batch.loss_mask, encoder.tok.specials.im_end)
    hit = (logits.argmax(-1) == batch.labels) & mask
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch.labels, reduction="none"
    )
    counts = mask.sum(1)
    return [
        {"exact": bool(h == c) and int(c) > 0, "right": int(h), "tokens": int(c), "loss": float(ls)}
        for h, c, ls in zip(hit.sum(1), counts, (losses * mask).sum(1), strict=True)
    ]


@dataclass
class Group:
    rows: int = 0
    failed: Counter = field(default_factory=Counter)
    tf_rows: int = 0
    tf_exact: int = 0
    tf_right: int = 0  # answer tokens that are the argmax
    tokens: int = 0
    loss_sum: float = 0.0
    gen_rows: int = 0
    gen_exact: int = 0
    asr_rows: int = 0
    words: m.EditCounts = field(default_factory=m.EditCounts)
    chars: m.EditCounts = field(default_factory=m.EditCounts)

    def add(self, o: Group) -> None:
        for name in ("rows", "tf_rows", "tf_exact", "tf_right", "tokens", "loss_sum", "gen_rows"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.gen_exact += o.gen_exact
        self.asr_rows += o.asr_rows
        self.failed.update(o.failed)
        self.words.add(o.words)
        self.chars.add(o.chars)

    def report(self, wanted: Iterable[str]) -> dict:
        wanted = set(wanted)
        out: dict = {"rows": self.rows, "failed": dict(sorted(self.failed.items()))}
        if wanted & {"loss", "exact"}:
            out["teacher_forced_rows"] = self.tf_rows
        if "loss" in wanted:
            out["loss"] = self.loss_sum / self.tokens if self.tokens else None
            out["answer_tokens"] = self.tokens
        if "exact" in wanted:
            out["exact"] = self.tf_exact / self.tf_rows if self.tf_rows else None
            out["token_accuracy"] = self.tf_right / self.tokens if self.tokens else None
        if "generate" in wanted:
            out["generated_rows"] = self.gen_rows
            out["generate_exact"] = self.gen_exact / self.gen_rows if self.gen_rows else None
        if "wer" in wanted:
            out["transcription_rows"] = self.asr_rows
            out["wer"], out["cer"] = self.words.rate, self.chars.rate
        return out


def evaluate(
    model,
    cfg: JobConfig,
    rows: list[EvalRow],
    wanted: Iterable[str] = METRICS,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    device: torch.device | None = None,
) -> tuple[dict, list[dict]]:
    """Score ``model`` (an ``OmniModel`` in eval mode) on ``rows``: ({"groups": [{source,
    category, **metrics}], "total": {...}, "metrics": [...]}, one record per row)."""
    wanted = tuple(wanted)
    device = device or next(model.parameters()).device
    encoder = task_encoder(cfg, training=False)
    groups: dict[tuple[str, str], Group] = {}
    records = [{"source": r.source, "key": r.key, "category": r.category} for r in rows]
    for r, rec in zip(rows, records, strict=True):
        g = groups.setdefault((r.source, r.category), Group())
        g.rows += 1
        if r.error:
            g.failed[r.error.split(":")[0]] += 1
            rec["error"] = r.error
    live = [(r, rec) for r, rec in zip(rows, records, strict=True) if r.conv is not None]

    def fail(r: EvalRow, rec: dict, what: str, error: str) -> None:
        groups[(r.source, r.category)].failed[f"{what}:{error.split(':')[0]}"] += 1
        rec[f"{what}_error"] = error

    if {"loss", "exact"} & set(wanted):
        ok = []
        for r, rec in live:
            try:
                encoder.encode(r.conv)
                ok.append((r, rec))
            except SampleError as e:
                fail(r, rec, "teacher_forced", str(e))
        for start in range(0, len(ok), batch_size):
            chunk = ok[start : start + batch_size]
            scores = teacher_forced(model, encoder, [r.conv for r, _ in chunk], device)
            for (r, rec), s in zip(chunk, scores, strict=True):
                g = groups[(r.source, r.category)]
                rec.update(answer_tokens=s["tokens"], loss=s["loss"], exact=s["exact"])
                g.tf_rows += 1
                g.tf_exact += s["exact"]
                g.tf_right += s["right"]
                g.tokens += s["tokens"]
                g.loss_sum += s["loss"]
    gen_rows = live
    if "generate" not in wanted:
        gen_rows = [(r, rec) for r, rec in live if r.transcription] if "wer" in wanted else []
    if gen_rows:
        answers = answer_rows(
            model, cfg, [(r.key, r.conv) for r, _ in gen_rows], sampling or SamplingConfig(),
            batch_size, device,
        )  # fmt: skip
        for (r, rec), a in zip(gen_rows, answers, strict=True):
            g = groups[(r.source, r.category)]
            if "error" in a:
                fail(r, rec, "generate", a["error"])
                continue
            if a.get("answer") is None:
                fail(r, rec, "generate", "no_answer: the conversation has no assistant turn")
                continue
            rec.update(generated=a["text"], answer=a["answer"], stopped=a["stopped"])
            if "generate" in wanted:
                rec["generate_exact"] = m.exact_match(a["text"], a["answer"])
                g.gen_rows += 1
                g.gen_exact += rec["generate_exact"]
            if "wer" in wanted and r.transcription:
                w, c = m.word_edits(a["text"], a["answer"]), m.char_edits(a["text"], a["answer"])
                rec.update(word_errors=w.errors, words=w.length)
                rec.update(char_errors=c.errors, chars=c.length)
                g.asr_rows += 1
                g.words.add(w)
                g.chars.add(c)
    total = Group()
    for g in groups.values():
        total.add(g)
    result = {
        "metrics": list(wanted),
        "groups": [
            {"source": s, "category": c, **g.report(wanted)} for (s, c), g in groups.items()
        ],
        "total": total.report(wanted),
    }
    return result, records


def heldout_rows(cfg: JobConfig) -> list[EvalRow]:
    """The rows ``trainer.eval_answers`` scores (:class:`~omni_train.config.training.
    AnswerEvalConfig`): its ``data`` or the stage's own datasets, split ``data.eval_split``,
    only ``categories`` (when set), ``num_samples`` in all, taken a row from each (source,
    category) group in turn (groups in reading order, rows in file order)."""
    a, d = cfg.trainer.eval_answers, cfg.data
    if a.data is not None:
        rows = read_eval_rows(a.data, a.media, d.eval_split)
    else:
        dirs = stage_dataset_dirs(d.blend, d.paths, d.synthetic_root, d.path)
        rows = [r for folder in dirs for r in read_eval_rows(folder, None, d.eval_split)]
    if a.categories:
        rows = [r for r in rows if r.category in a.categories]
    groups: dict[tuple[str, str], list[EvalRow]] = {}
    for r in rows:
        groups.setdefault((r.source, r.category), []).append(r)
    if not groups:
        where = a.data or f"the stage's datasets ({d.eval_split} split)"
        raise ValueError(
            f"trainer.eval_answers: no rows in {where}"
            + (f" of categories {list(a.categories)}" if a.categories else "")
        )
    chosen: list[EvalRow] = []
    queues = [list(g) for g in groups.values()]
    while len(chosen) < a.num_samples and any(queues):
        for q in queues:
            if q and len(chosen) < a.num_samples:
                chosen.append(q.pop(0))
    return chosen


def answer_metrics(model, cfg: JobConfig, rows: list[EvalRow]) -> dict:
    """``trainer.eval_answers``' metrics of ``model`` (the ``OmniModel`` being trained, in any
    mode, built with the stage's layout) on ``rows``: :func:`evaluate`'s result. Runs in eval
    mode with sequence parallelism off, then puts both back; the RNG streams are forked, so a
    stage trains the same with or without it."""
    a = cfg.trainer.eval_answers
    sampling = SamplingConfig(max_new_tokens=a.max_new_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), without_sequence_parallel(model):
        model.eval()
        try:
            result, _ = evaluate(
                model, generation_view(cfg), rows, a.metrics, sampling, a.batch_size, device
            )
        finally:
            model.train(was_training)
    return result


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if pct else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_table(result: dict) -> str:
    cols = [("rows", "rows", False), ("failed", "failed", False)]
    cols += [("loss", "loss", False), ("exact", "tf_exact", True)]
    cols += [("generate_exact", "gen_exact", True), ("wer", "wer", True), ("cer", "cer", True)]
    cols = [c for c in cols if c[0] in result["total"]]
    rows = [(f"{g['source']} / {g['category']}", g) for g in result["groups"]]
    rows.append(("total", result["total"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'source / category':{width}s} " + " ".join(f"{h:>9s}" for _, h, _ in cols)]
    for name, g in rows:
        cells = []
        for key, _, pct in cols:
            v = sum(g[key].values()) if key == "failed" else g[key]
            cells.append(f"{_fmt(v, pct):>9s}")
        lines.append(f"{name:{width}s} " + " ".join(cells))
    return "\n".join(lines)


def run(
    checkpoint: str | Path,
    data: str | Path,
    media_root: str | Path | None,
    overrides: list[str],
    wanted: Iterable[str] = METRICS,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
) -> tuple[dict, list[dict]]:
    """Build the model of ``overrides`` (checked against the checkpoint's manifest), load
    ``checkpoint`` and :func:`evaluate` it on ``data``."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    cfg = generation_config(overrides)
    check_model_fingerprint(checkpoint, config_hash(cfg, sections=("model",)))
    rows = read_eval_rows(data, media_root)
    with loaded_model(cfg, checkpoint) as (model, ps, device):
        result, records = evaluate(model, cfg, rows, wanted, sampling, batch_size, device)
        result["is_main"] = ps.is_main
        return result, records


def main(argv: list[str] | None = None) -> int:
    install_filters()  # an entry point: see omni_train.log.QUIET
    parser = argparse.ArgumentParser(prog="omni-train eval", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a stage's output folder or one of its checkpoints")
    parser.add_argument("--data", required=True, help="a JSONL file or a converted dataset")
    parser.add_argument("--media", default=None, help="a JSONL's media folder (default: its own)")
    parser.add_argument("--metrics", default=",".join(METRICS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the results (and every row) here")
    args, overrides = parser.parse_known_args(argv)
    wanted = parse_metrics(args.metrics)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    result, records = run(
        args.checkpoint, args.data, args.media, overrides, wanted, sampling, args.batch_size
    )
    if result.pop("is_main"):
        print(format_table(result), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**result, "rows": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
