"""``omni-train data show FILE.jsonl --media DIR``: what the model will see of each sample.

Every line goes through the same code a training job runs (the task encoder's planning: chat
template, media probing, token accounting, the stage's context length), with no pixel decoded.
Per sample: the rendered text with placeholder runs collapsed (``<image>x256``), the token ids,
the loss mask (per token: does this token carry loss), and per media part what it became. A
line that cannot be used is reported with its line number and skip reason, and counted.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from omni_train.data.chat import Layout
from omni_train.data.conversation import SampleError
from omni_train.data.loader import task_encoder
from omni_train.data.plans import AudioPlan, ImagePlan, VideoPlan
from omni_train.data.task_encoder import cook_raw
from omni_train.datatools.convert import ConvertError, sample_from_line


def _media(plan, audio_rate: int) -> dict:
    if isinstance(plan, ImagePlan):
        return {"kind": "image", "grid": [plan.rows, plan.cols], "tokens": plan.num_tokens}
    if isinstance(plan, AudioPlan):
        return {
            "kind": "audio",
            "seconds": round(plan.num_samples / audio_rate, 3),
            "clip_tokens": list(plan.clips),
            "tokens": plan.num_tokens,
        }
    assert isinstance(plan, VideoPlan)
    return {
        "kind": "video",
        "frames": len(plan.timestamps),
        "groups": plan.num_groups,
        "grid": [plan.rows, plan.cols],
        "tokens": plan.num_groups * plan.tokens_per_group,
        "audio_tokens": plan.audio_tokens,
    }


def render_collapsed(lay: Layout, tok) -> str:
    """The sample as text, each placeholder run as ``<token>xN``."""
    out = []
    for piece in lay.pieces:
        if isinstance(piece, tuple):
            tid, n = piece
            out.append(f"{tok.hf.convert_ids_to_tokens(tid)}x{n}")
        else:
            out.append(tok.hf.decode(piece))
    return "".join(out)


def _runs(flags: list[bool]) -> str:
    """``[F, F, T, T, T]`` -> ``"0x2 1x3"``."""
    parts, prev, n = [], None, 0
    for f in flags:
        if f is prev:
            n += 1
            continue
        if prev is not None:
            parts.append(f"{int(prev)}x{n}")
        prev, n = f, 1
    if prev is not None:
        parts.append(f"{int(prev)}x{n}")
    return " ".join(parts)


def show(jsonl: str | Path, media_root: str | Path, cfg) -> tuple[list[dict], Counter]:
    """One record per line of ``jsonl`` (samples in the ``data convert`` format), and the
    skip reasons counted."""
    encoder = task_encoder(cfg, training=False)  # the evaluation stream's: no random budgets
    rate = cfg.model.audio.sample_rate if cfg.model.audio else 16000
    records, skipped = [], Counter()
    for lineno, line in enumerate(Path(jsonl).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = sample_from_line(line, Path(media_root), f"line_{lineno}")
            planned = encoder.plan(cook_raw(raw.key, raw.tar_members()))
        except (ConvertError, SampleError) as e:
            skipped[e.reason] += 1
            records.append({"line": lineno, "skipped": e.reason, "error": str(e)})
            continue
        ids, loss = planned.layout.materialize()
        records.append(
            {
                "line": lineno,
                "key": raw.key,
                "layout": cfg.data.layout,
                "num_tokens": len(ids),
                "num_loss_tokens": sum(loss),
                "text": render_collapsed(planned.layout, encoder.tok),
                "ids": ids,
                "loss_mask": [int(f) for f in loss],
                "media": [_media(p, rate) for p in planned.plans],
            }
        )
    return records, skipped


def format_text(records: list[dict], skipped: Counter) -> str:
    out = []
    for r in records:
        if "skipped" in r:
            out.append(f"== line {r['line']}: skipped ({r['error']})\n")
            continue
        media = "; ".join(
            f"{m['kind']} " + ", ".join(f"{k}={v}" for k, v in m.items() if k != "kind")
            for m in r["media"]
        )
        out.append(
            f"== line {r['line']} {r['key']!r}: {r['num_tokens']} tokens, "
            f"{r['num_loss_tokens']} with loss ({r['layout']} layout)\n"
            f"{r['text']}\n"
            f"-- ids: {r['ids']}\n"
            f"-- loss mask: {_runs([bool(x) for x in r['loss_mask']])}\n"
            f"-- media: {media or 'none'}\n"
        )
    total = sum(1 for r in records if "skipped" not in r)
    out.append(f"{total} samples shown, {sum(skipped.values())} skipped {dict(skipped) or ''}")
    return "\n".join(out)
