"""How evenly the sharded media encoders spread a packed sequence's work over their group.

Under context (and tensor) parallelism each rank encodes its share of a micro-batch's media
(``omni_train.parallel.encoder_shard``): ViT pieces (images, video tubelets) over the CP group by
their ViT length, audio clips over TP x CP by count (each is padded to the longest clip, as one
process pads them). This counts the ViT tokens (patches + class tokens) and the conformer frames
each rank encodes, with the same ``assign`` the model calls, on two media mixes of each stage:

* ``planner``: the planner's assumptions (``omni-train plan``): the blend's vision and audio
  tokens per packed sequence (``media_mix.yaml``) in pieces of ``--patches-per-image`` patches
  and clips of ``model.audio.clip_seconds``;
* ``sampled``: ``--sequences`` packed sequences filled with samples drawn by the blend's token
  shares, each ``mean_tokens x U(0.5, 1.5)`` long; image pieces of ``U(min_patches,
  max_patches)`` patches (dynamic resolution), video pieces of a ``video_patch_budgets`` entry,
  clips of up to ``clip_seconds`` (a stream's last one shorter). These distributions are
  assumptions, stated so that they can be replaced.

Baselines in the same run: the encoders replicated over the group (what megatron-core does:
every rank encodes everything) and a round-robin assignment (item ``i`` to rank ``i % group``).
The figure of merit is the largest rank's work over the mean (1.00 = even); the issue's target
is <= 1.10 at CP 16 (stage 6) and CP 2 (stage 5).

    python benchmarks/encoder_balance.py [--stages stage5_omni_sft_48k,stage6_omni_sft_256k]
        [--sequences 64] [--out benchmarks/results/encoder_balance.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMNI_TRAIN_PLATFORM", "cpu")

from omni_train.config import compose_job  # noqa: E402
from omni_train.parallel.encoder_shard import assign, loads  # noqa: E402
from omni_train.plan import planner  # noqa: E402

TARGET = 1.10


def planner_items(cfg, a: planner.Assumptions) -> tuple[list[int], list[int]]:
    """(ViT tokens per piece, frames per clip) of one packed sequence as the planner sees it."""
    m, s = cfg.model, cfg.trainer.seq_length
    vision, audio, _ = planner.media_shares(cfg.data.blend)
    cls = m.vision.num_class_tokens
    pieces = planner._sizes(round(s * vision * planner.SHUFFLE_PATCHES), a.patches_per_image)
    clips = planner._sizes(round(s * audio), planner._clip_tokens(m))
    return [p + cls for p in pieces], clips


def sampled_items(cfg, rng: random.Random) -> tuple[list[int], list[int]]:
    """(ViT tokens per piece, frames per clip) of one sequence filled with sampled samples."""
    m, s = cfg.model, cfg.trainer.seq_length
    v, cls = m.vision, m.vision.num_class_tokens
    _, _, rows = planner.media_shares(cfg.data.blend)
    clip = planner._clip_tokens(m)
    pieces, clips, used = [], [], 0
    while True:
        r = rng.choices(rows, weights=[r["share"] for r in rows])[0]
        length = max(1, round(r["mean_tokens"] * rng.uniform(0.5, 1.5)))
        if used + length > s:
            break
        used += length
        patches = round(length * r["vision"]) * planner.SHUFFLE_PATCHES
        video = "video" in r["category"] or "omni" in r["category"]
        while patches > 0:
            size = rng.choice(v.video_patch_budgets) if video else (
                rng.randint(v.min_patches, v.max_patches)
            )  # fmt: skip
            size = min(size, patches)
            pieces.append(size + cls)
            patches -= size
        clips += planner._sizes(round(length * r["audio"]), clip)
    return pieces, clips


def balance(costs: list[int], group: int, how) -> dict:
    owner = how(costs, group)
    per_rank = loads(costs, owner, group)
    mean = sum(costs) / group
    return {"max": max(per_rank), "mean": mean, "ratio": max(per_rank) / mean if mean else 1.0}


def round_robin(costs: list[int], group: int) -> list[int]:
    return [i % group for i in range(len(costs))]


def measure(costs: list[int], group: int) -> dict:
    """Per-rank work of one sequence's items: LPT (ours), round-robin, replicated."""
    ours = balance(costs, group, assign)
    rr = balance(costs, group, round_robin)
    total = sum(costs)
    return {
        "items": len(costs),
        "total": total,
        "lpt": ours,
        "round_robin": rr,
        "replicated_over_ours": total / ours["max"] if ours["max"] else 1.0,
    }


def stage_rows(stage: str, sequences: int, a: planner.Assumptions) -> list[dict]:
    cfg = compose_job([f"stage={stage}"])
    tp, cp = cfg.parallel.tp, cfg.parallel.cp
    rows = []
    pieces, clips = planner_items(cfg, a)
    longest = max(clips, default=0)
    for encoder, group, costs, unit in (
        ("vision", cp, pieces, "ViT tokens"),
        ("audio", tp * cp, [longest] * len(clips), "frames (padded)"),
    ):
        if costs:
            rows.append({"stage": stage, "mix": "planner", "encoder": encoder, "group": group,
                         "unit": unit, **measure(costs, group)})  # fmt: skip
    rng = random.Random(0)
    samples = [sampled_items(cfg, rng) for _ in range(sequences)]
    for encoder, group, unit in (("vision", cp, "ViT tokens"), ("audio", tp * cp, "frames")):
        runs = []
        for pieces, clips in samples:
            costs = pieces if encoder == "vision" else [max(clips)] * len(clips) if clips else []
            if costs:
                runs.append(measure(costs, group))
        if not runs:
            continue
        worst = max(runs, key=lambda r: r["lpt"]["ratio"])
        rows.append({
            "stage": stage, "mix": f"sampled ({len(runs)} seq.)", "encoder": encoder,
            "group": group, "unit": f"{unit} (worst sequence)", **worst,
            "mean_ratio": sum(r["lpt"]["ratio"] for r in runs) / len(runs),
            "mean_round_robin_ratio": sum(r["round_robin"]["ratio"] for r in runs) / len(runs),
            "peak_per_rank": max(r["lpt"]["max"] for r in runs),
        })  # fmt: skip
    return rows


def exchange_rows_received(stage: str, a: planner.Assumptions) -> dict | None:
    """Rows of vision features the most loaded rank receives per packed sequence with the
    all-to-all (only its shard's placeholders) against an all-gather (every row), from the real
    route (``build_route``) on a sequence of the planner's samples: each category's samples at
    its mean length, vision placeholders after a 16-token prompt, each sample padded to the CP
    layout's multiple."""
    import torch

    from omni_train.parallel.encoder_shard import EncoderGroup, build_route
    from omni_train.platform.kernels.cp_layout import position_owner

    cfg = compose_job([f"stage={stage}"])
    s, cp, tp = cfg.trainer.seq_length, cfg.parallel.cp, cfg.parallel.tp
    _, _, rows = planner.media_shares(cfg.data.blend)
    if cp == 1:
        return None
    multiple = 2 * cp * tp
    ids, bounds, image = [], [0], 1
    for r in sorted(rows, key=lambda r: -r["vision"]):
        length = min(int(r["mean_tokens"]), s)
        for _ in range(round(s * r["share"] / length)):
            padded = length + (-length % multiple)
            if bounds[-1] + padded > s:
                break
            vision = int(length * r["vision"])
            ids += [0] * 16 + [image] * min(vision, length - 16) + [0] * (padded - 16 - vision)
            ids = ids[: bounds[-1] + padded]
            bounds.append(bounds[-1] + padded)
    ids += [0] * (s - len(ids))
    bounds.append(s) if bounds[-1] != s else None
    x = torch.tensor(ids)
    placeholder = (x == image).nonzero().flatten()
    n = placeholder.numel()
    if not n:
        return None
    dest = position_owner(s, cp, torch.tensor(bounds, dtype=torch.int32))[placeholder]
    pieces = planner._sizes(n * planner.SHUFFLE_PATCHES, a.patches_per_image)
    owner_piece = assign(pieces, cp)
    owner = torch.tensor(owner_piece).repeat_interleave(
        torch.tensor([p // planner.SHUFFLE_PATCHES for p in pieces])
    )[:n]
    received = [sum(build_route(owner, dest, EncoderGroup(None, cp, m, 1)).recv_splits)
                for m in range(cp)]  # fmt: skip
    width = cfg.model.hidden_size * 2  # bf16 rows of the LM's width
    return {"stage": stage, "rows": n, "cp": cp, "all_to_all_max_rows": max(received),
            "all_gather_rows": n, "all_to_all_mib": max(received) * width / 2**20,
            "all_gather_mib": n * width / 2**20}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default="stage5_omni_sft_48k,stage6_omni_sft_256k")
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--patches-per-image", type=int, default=planner.Assumptions.patches_per_image)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    a = planner.Assumptions(patches_per_image=args.patches_per_image)
    start = time.time()
    rows = [r for s in args.stages.split(",") for r in stage_rows(s, args.sequences, a)]
    seconds = time.time() - start
    lines = [
        "# Sharded encoders: work per rank",
        "",
        f"Command: `python benchmarks/encoder_balance.py --stages {args.stages} --sequences "
        f"{args.sequences}{' --out ' + str(args.out) if args.out else ''}` ({seconds:.1f} s, "
        "one CPU process; no model runs: it counts the work each rank is given by the "
        "assignment the model uses). Mixes and baselines: the script's docstring.",
        "",
        "*max / mean*: the most loaded rank's work over the group's mean (target <= "
        f"{TARGET:.2f}). *replicated / ours*: the work of a rank that encodes every item "
        "(megatron-core's CP) over our most loaded rank's.",
        "",
        "| stage | mix | encoder | group | items | unit | total | max per rank | max / mean "
        "| round-robin max / mean | replicated / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['mix']} | {r['encoder']} | {r['group']} | {r['items']} "
            f"| {r['unit']} | {r['total']:,} | {r['lpt']['max']:,} | {r['lpt']['ratio']:.3f} "
            f"| {r['round_robin']['ratio']:.3f} | {r['replicated_over_ours']:.1f}x |"
        )
    sampled = [r for r in rows if "mean_ratio" in r]
    if sampled:
        lines += [
            "",
            "Sampled mixes: max / mean averaged over the sequences (ours / round-robin), and the "
            "most any rank encodes in any sequence (what its activation memory follows; "
            "compare the planner mix's max per rank):",
            "",
        ]
        for r in sampled:
            lines.append(f"- {r['stage']} {r['encoder']}: {r['mean_ratio']:.3f} / "
                         f"{r['mean_round_robin_ratio']:.3f}; most per rank "
                         f"{r['peak_per_rank']:,} {r['unit'].split(' (')[0]}")  # fmt: skip
        lines += [
            "",
            "A sequence with few media items (mostly text) cannot be spread evenly: its worst "
            "ratio is high, but its largest rank encodes far less than a media-heavy sequence's.",
        ]
    traffic = [t for t in (exchange_rows_received(st, a) for st in args.stages.split(",")) if t]
    if traffic:
        lines += [
            "",
            "The exchange (vision rows, one packed sequence of the planner's samples): what the "
            "most loaded rank receives with the all-to-all omni-train uses, against an all-gather "
            "of every row (each rank would also hold that buffer):",
            "",
            "| stage | CP | vision rows | all-to-all: rows (MiB) | all-gather: rows (MiB) "
            "| ratio |",
            "|---|---|---|---|---|---|",
        ]
        for t in traffic:
            ratio = t["all_gather_rows"] / t["all_to_all_max_rows"]
            lines.append(
                f"| {t['stage']} | {t['cp']} | {t['rows']:,} | {t['all_to_all_max_rows']:,} "
                f"({t['all_to_all_mib']:.0f}) | {t['all_gather_rows']:,} "
                f"({t['all_gather_mib']:.0f}) | {ratio:.1f}x |"
            )
    met = all(r["lpt"]["ratio"] <= TARGET for r in rows if r["mix"] == "planner")
    lines += ["", f"Target (planner mixes, max / mean <= {TARGET:.2f}): "
              f"{'met' if met else 'MISSED'}."]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
        record = {"balance": rows, "exchange": traffic}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
