"""``omni-train plan stage=<recipe> [overrides] [--json]``: will the stage fit, and how long
will it take?

Per-rank peak memory = weights + gradients + optimizer state (the dry run's, from the real
model and megatron's real process groups: :mod:`omni_train.plan.dry_run`) + the activations
autograd keeps (measured per layer kind: :mod:`omni_train.plan.costs`) + the largest transient
above them + communication buffers + CUDA context, plus allocator headroom. How each part is
made, and what is assumed rather than measured (``Assumptions``, ``media_mix.yaml``):

* **LM activations**: every layer of the hybrid pattern at the rank's ``seq_length / cp``
  tokens (packed, one sequence per micro-batch) under the stage's TP + SP and selective
  recompute, trainable or frozen as the stage says; under context parallel each attention layer
  also keeps the keys and values of the whole sequence for backward (ring / all-gather CP), an
  analytic term: ``2 x groups/tp x head_dim x 2 bytes`` per token of ``seq_length (cp-1)/cp``.
* **Encoder activations**: the vision and audio tokens of a packed sequence come from the blend
  (token shares x ``media_mix.yaml``). A vision token is ``2 x 2`` ViT patches (pixel shuffle),
  in images (or tubelets) of ``Assumptions.patches_per_image``; audio comes in clips of
  ``model.audio.clip_seconds``. The encoders are sharded (``omni_train.parallel.encoder_shard``):
  the pieces are shared out over the CP group and the clips over TP x CP by the training code's
  own assignment, and a rank keeps the activations of its largest share (:func:`encoder_shares`).
  The rows the exchange sends and receives are a transient (``encoder_exchange``: the send,
  receive and reordered buffers, ``[rows, hidden]`` bf16).
* **Time**: hardware FLOPs per rank (:mod:`omni_train.training.flops`: recompute included,
  the LM split over TP x CP, the ViT over TP and its pieces over CP, the conformer's clips over
  TP x CP) at the GPU's bf16 peak times an assumed utilisation (``--mfu``), for a sequence
  packed from the blend's categories at their mean sample lengths.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from omni_train.config import compose_job, validate
from omni_train.config.blends import _train_entries, expected_token_shares
from omni_train.config.training import RECOMPUTE_LM_MODULES
from omni_train.data import tokens
from omni_train.log import install_filters
from omni_train.parallel.encoder_shard import assign, loads
from omni_train.plan import dry_run
from omni_train.plan.costs import ActivationCosts, setting_key
from omni_train.training import flops
from omni_train.training.flops import device_peak_tflops

GIB = 1024**3
MEDIA_MIX = Path(__file__).parent / "media_mix.yaml"
SHUFFLE_PATCHES = tokens.SHUFFLE**2  # ViT patches per LM vision token (pixel shuffle)
TIGHT = 0.90  # above this share of GPU memory a plan is "tight"


@dataclass(frozen=True)
class Assumptions:
    """What the planner assumes rather than measures (each overridable on the command line)."""

    mfu: float = 0.30  # model FLOPs utilisation (bf16 dense peak) for time estimates
    cuda_context_gib: float = 0.75  # CUDA context + cuBLAS/cuDNN workspaces per GPU
    comm_buffers_gib: float = 1.5  # NCCL buffers of the TP, CP, EP, DP communicators
    fragmentation: float = 0.05  # allocator headroom, share of everything else
    patches_per_image: int = 1024  # mean ViT patches per image / tubelet (512 x 512 px)
    # The Mamba scan kernel on the GPUs: mamba_ssm (NVIDIA's containers) keeps its input and
    # its scan output (MambaSplitConv1dScanCombinedFn.save_for_backward: zxbcdt, out_x);
    # torch: omni-train's pure-PyTorch scan, as measured (what runs without mamba-ssm).
    mamba_kernel: str = "mamba_ssm"
    # sharded: what omni-train runs; replicated: every rank of a CP group encodes every item and
    # embeds the whole sequence (megatron-core's LLaVA, omni-train before): a baseline to compare
    encoders: str = "sharded"

    def __post_init__(self) -> None:
        if self.mamba_kernel not in ("mamba_ssm", "torch"):
            raise ValueError(f"--mamba-kernel {self.mamba_kernel!r}; valid: mamba_ssm, torch")
        if self.encoders not in ("sharded", "replicated"):
            raise ValueError(f"--encoders {self.encoders!r}; valid: sharded, replicated")


@functools.lru_cache
def media_shares(blend: str | None) -> tuple[float, float, list[dict]]:
    """(vision share, audio share) of a packed sequence's tokens, and the blend's categories
    as ``{category, share, mean_tokens, vision, audio}``. No blend: text only."""
    if blend is None:
        return 0.0, 0.0, []

    mix = yaml.safe_load(MEDIA_MIX.read_text())
    shares = expected_token_shares(blend)
    rows = []
    for entry in _train_entries(blend):
        var = entry["path"].strip("${}")
        if var not in mix:
            raise ValueError(
                f"blend {blend}: dataset variable {var!r} has no entry in {MEDIA_MIX}; add its "
                "vision and audio token shares"
            )
        sub = entry["subflavors"]
        rows.append({"category": sub["category"], "share": shares[sub["category"]],
                     "mean_tokens": sub["mean_tokens"], **mix[var]})  # fmt: skip
    vision = sum(r["share"] * r["vision"] for r in rows)
    audio = sum(r["share"] * r["audio"] for r in rows)
    return vision, audio, rows


def _clip_tokens(m) -> int:
    """Encoder frames (= LM audio tokens) of one full clip."""
    return tokens.audio_clip_tokens(round(m.audio.clip_seconds * m.audio.sample_rate), m.audio)


def _lm_key(cfg) -> str:
    chosen = set(cfg.recompute.lm)
    if chosen not in (set(), set(RECOMPUTE_LM_MODULES)):
        raise ValueError(
            f"recompute.lm={cfg.recompute.lm}: activation costs are measured with none or all of "
            f"{list(RECOMPUTE_LM_MODULES)}; plan one of those"
        )
    return setting_key(bool(chosen), "llm" in cfg.stage.trainable)


def activations(cfg, costs: ActivationCosts, a: Assumptions, cp: int) -> dict:
    """Per-rank activation bytes by component, and the largest transient (see module doc)."""
    m, s = cfg.model, cfg.trainer.seq_length
    local = s / cp
    key = _lm_key(cfg)
    lm = sum(costs.saved(k, key, gpu=True)(local) for k in m.hybrid_pattern)
    if a.mamba_kernel == "mamba_ssm" and "M" in m.hybrid_pattern:
        # swap what the measured pure-PyTorch scan keeps (its graph, and its input if the
        # graph holds it) for what mamba-ssm's keeps: its input zxbcdt and scan output out_x
        heads, groups = m.mamba_num_heads // costs.tp, m.mamba_num_groups // costs.tp
        d_inner = heads * m.mamba_head_dim
        zxbcdt = local * (2 * d_inner + 2 * groups * m.mamba_state_dim + heads) * 2
        out_x = local * d_inner * 2
        ours = costs.saved("mamba_kernel", "kernel")(local)
        ours += costs.saved("mamba_kernel", "input")(local)
        swap = zxbcdt + out_x - ours
        lm += m.hybrid_pattern.count("M") * swap
    lm += costs.saved("head", key, gpu=True)(local)
    kv = 0.0
    if cp > 1:
        per_token = 2 * (m.num_query_groups / costs.tp) * m.head_dim * 2
        kv = m.hybrid_pattern.count("*") * per_token * s * (cp - 1) / cp
    out = {"llm": lm, "llm_cp_kv": kv}
    transients = {"llm": costs.transient("lm", key)(local)}
    shares = encoder_shares(cfg, a, costs.tp, cp)
    vision_share, audio_share, _ = media_shares(cfg.data.blend)
    if m.vision is not None and vision_share > 0:
        patches = s * vision_share * SHUFFLE_PATCHES * shares["vision"]["rank_share"]
        out["vision"], transients["vision"] = _encoder(
            cfg, costs, "vision", "vit_block", m.vision.num_layers, patches, a.patches_per_image
        )
    if m.audio is not None and audio_share > 0:
        frames = s * audio_share * shares["audio"]["rank_share"]
        out["audio"], transients["audio"] = _encoder(
            cfg, costs, "audio", "conformer_layer", m.audio.num_layers, frames, _clip_tokens(m)
        )
    if a.encoders == "replicated" and cp > 1:
        # every CP rank embeds and splices the whole sequence before keeping its share: the
        # [s, h] embedding and its spliced copy, bf16 (analytic)
        transients["llm_cp_embedding"] = 2 * s * m.hidden_size * 2
    if shares["vision"]["group"] > 1 or shares["audio"]["group"] > 1:
        # the rows of a rank's own items sent; those of its positions received and reordered
        rows = s * (vision_share + audio_share)
        sent = rows * max(shares["vision"]["rank_share"], shares["audio"]["rank_share"])
        transients["encoder_exchange"] = (sent + 2 * rows / cp) * m.hidden_size * 2
    # a micro-batch holds micro_batch_size sequences (1 when packing): all of them are kept
    out = {k: v * cfg.trainer.micro_batch_size for k, v in out.items()}
    largest = max(transients, key=transients.get)
    return {"saved": out, "transient": transients[largest], "transient_of": largest}


def encoder_shares(cfg, a: Assumptions, tp: int, cp: int) -> dict:
    """Per encoder: the size of the group its items are shared out over (vision: CP; audio:
    TP x CP), and the share of a packed sequence's encoder work its most loaded rank gets under
    the training code's assignment (``omni_train.parallel.encoder_shard.assign``), for the items
    the planner assumes: pieces of ``patches_per_image``, clips of ``clip_seconds`` (each
    padded to the longest, as the model pads them: equal cost). ``imbalance`` = that share x
    the group size (1.0 = perfectly even)."""
    m, s = cfg.model, cfg.trainer.seq_length
    vision, audio, _ = media_shares(cfg.data.blend)
    clips = len(_sizes(round(s * audio), _clip_tokens(m))) if m.audio is not None else 0
    out = {}
    groups = (cp, tp * cp) if a.encoders == "sharded" else (1, 1)
    for name, group, items in (
        ("vision", groups[0], _sizes(round(s * vision * SHUFFLE_PATCHES), a.patches_per_image)),
        ("audio", groups[1], [1] * clips),
    ):
        total = sum(items)
        share = max(loads(items, assign(items, group), group)) / total if total else 1.0
        out[name] = {"group": group, "rank_share": share, "imbalance": share * group}
    return out


def _encoder(cfg, costs, group: str, layer: str, num_layers: int, units: float, item: int):
    """(saved, transient) bytes of the ``group`` encoder and its projector over ``units`` ViT
    patches / encoder frames in items (images, clips) of ``item`` each."""
    trains, rc = set(cfg.stage.trainable), cfg.recompute
    encoder = f"{group}_encoder"
    trains_encoder = encoder in trains
    key = setting_key(getattr(rc, encoder) and trains_encoder, trains_encoder, rc.projectors)
    per_item = num_layers * costs.saved(layer, key, gpu=True)(item)
    per_item += costs.saved(f"{group}_rest", key, gpu=True)(item)
    # neither the encoder nor its projector trains: no gradient enters that subgraph
    trained = trains_encoder or f"{group}_projector" in trains
    return (units / item * per_item if trained else 0.0), costs.transient(group, key)(item)


def memory(cfg, dry: dict, costs: ActivationCosts, a: Assumptions, gpu_gib: float | None):
    g = dry["groups"]
    t = dry["memory"]["total"]
    act = activations(cfg, costs, a, g["cp"])
    parts = {
        "weights": t["param_gib"],
        "gradients": t["grad_gib"],
        "optimizer": t["optimizer_gib"],
        **{f"activations.{k}": v / GIB for k, v in act["saved"].items()},
        f"transient ({act['transient_of']})": act["transient"] / GIB,
        "comm_buffers": a.comm_buffers_gib,
        "cuda_context": a.cuda_context_gib,
    }
    parts["allocator_headroom"] = a.fragmentation * sum(parts.values())
    total = sum(parts.values())
    if gpu_gib is None:
        verdict = "unknown (cluster.gpu_memory_gib not set)"
    elif total > gpu_gib:
        verdict = "does not fit"
    elif total > TIGHT * gpu_gib:
        verdict = "tight"
    else:
        verdict = "fits"
    return {"parts_gib": parts, "total_gib": total, "gpu_gib": gpu_gib, "verdict": verdict}


# -- time -------------------------------------------------------------------------------------


def _sequence_flops(cfg, tp: int, cp: int, a: Assumptions) -> dict:
    """Hardware FLOPs per packed sequence on one rank, by part (see module doc)."""
    m, s = cfg.model, cfg.trainer.seq_length
    _, _, rows = media_shares(cfg.data.blend)
    rows = rows or [{"share": 1.0, "mean_tokens": s, "vision": 0.0, "audio": 0.0}]
    trainable, rc, adapted = list(cfg.stage.trainable), cfg.recompute, cfg.peft.components
    parts = {"llm": 0.0, "vision": 0.0, "audio": 0.0}
    shares = {k: v["rank_share"] for k, v in encoder_shares(cfg, a, tp, cp).items()}
    model_total = 0.0
    for r in rows:
        length = min(int(r["mean_tokens"]), s)
        count = s * r["share"] / length  # samples of this category in one sequence
        text = flops.Geometry([length], [], 0, [], 0)
        lm = flops.step_flops(m, text, trainable, rc, adapted)
        parts["llm"] += count * lm.hardware / (tp * cp)
        model_total += count * lm.model
        if m.vision is not None and r["vision"]:
            features = int(length * r["vision"])
            pieces = _split(SHUFFLE_PATCHES * features, a.patches_per_image)
            g = flops.Geometry([length], pieces, features, [], 0)
            f = flops.step_flops(m, g, trainable, rc, adapted)
            parts["vision"] += count * (f.hardware - lm.hardware) / tp * shares["vision"]
            model_total += count * (f.model - lm.model)
        if m.audio is not None and r["audio"]:
            features = int(length * r["audio"])
            frames = [n * m.audio.subsampling_factor for n in _sizes(features, _clip_tokens(m))]
            g = flops.Geometry([length], [], 0, frames, features)
            f = flops.step_flops(m, g, trainable, rc, adapted)
            parts["audio"] += count * (f.hardware - lm.hardware) * shares["audio"]
            model_total += count * (f.model - lm.model)
    return {"per_rank_hardware": parts, "model_per_sequence": model_total}


def _sizes(total: int, size: int) -> list[int]:
    full, rest = divmod(total, size)
    return [size] * full + ([rest] if rest else [])


def _split(patches: int, per_image: int) -> list[tuple[int, int]]:
    return [(n, 1) for n in _sizes(patches, per_image)]


def timing(cfg, groups: dict, a: Assumptions, peak_tflops: float | None) -> dict:
    f = _sequence_flops(cfg, groups["tp"], groups["cp"], a)
    sequences = cfg.trainer.global_batch_size / groups["dp"]  # per DP rank (its TP x CP group)
    per_rank = sequences * sum(f["per_rank_hardware"].values())
    out = {"hardware_tflop_per_rank_step": per_rank / 1e12, "assumed_mfu": a.mfu}
    if peak_tflops is None:
        return out | {"step_s": None}
    step = per_rank / (peak_tflops * 1e12 * a.mfu)
    tokens = cfg.trainer.global_batch_size * cfg.trainer.seq_length
    hours = cfg.trainer.train_steps * step / 3600
    return out | {
        "peak_tflops": peak_tflops,
        "step_s": step,
        "tokens_per_s": tokens / step,
        "stage_hours": hours,
        "gpu_hours": hours * groups["world"],
    }


# -- fixes ------------------------------------------------------------------------------------


def candidate_fixes(cfg, groups: dict) -> list[tuple[str, list[str]]]:
    """Changes that lower per-rank memory, cheapest first (compute, then GPUs per sequence,
    then the data): each ``(description, overrides)``."""
    m, r = cfg.model, cfg.recompute
    out = []
    more = []
    if m.audio is not None and not r.audio_encoder and "audio_encoder" in cfg.stage.trainable:
        more.append("recompute.audio_encoder=true")
    if not r.projectors:
        more.append("recompute.projectors=true")
    for o in more:
        out.append((f"recompute more: {o}", [o]))
    if len(more) > 1:
        out.append(("recompute more: " + " ".join(more), more))
    world, tp, cp = groups["world"], groups["tp"], groups["cp"]
    s, gbs = cfg.trainer.seq_length, cfg.trainer.global_batch_size
    new_cp = cp * 2
    while tp * new_cp <= world and world % (tp * new_cp) == 0:
        dp = world // (tp * new_cp)
        if s % (2 * new_cp * tp) == 0 and gbs % dp == 0:
            o = [f"parallel.cp={new_cp}"]
            out.append((f"larger context parallel: parallel.cp={new_cp} (DP {dp})", o))
            out.append((f"larger context parallel and recompute more: {' '.join(o + more)}",
                        o + more))  # fmt: skip
        new_cp *= 2
    half = s // 2
    out.append((f"shorter packed sequences: trainer.seq_length={half} "
                f"(and trainer.train_steps x2 to keep the tokens)",
                [f"trainer.seq_length={half}", *more]))  # fmt: skip
    return out


def smallest_fix(cfg, overrides, dry, costs, a, gpu_gib) -> dict | None:
    for text, extra in candidate_fixes(cfg, dry["groups"]):
        alt = compose_job([*overrides, *extra])
        try:  # a change the layout checks refuse (e.g. Mamba heads over CP) is no fix
            validate(alt, dry["groups"]["world"], data=False)
        except ValueError:
            continue
        groups = dict(dry["groups"], cp=alt.parallel.cp)
        # recompute, CP (DP x CP stays world / TP) and sequence length leave weights, gradients
        # and optimizer shards as they are: the dry run's figures hold
        mem = memory(alt, dict(dry, groups=groups), costs, a, gpu_gib)
        if mem["verdict"] in ("fits", "tight"):
            return {"change": text, "overrides": extra, "total_gib": mem["total_gib"],
                    "verdict": mem["verdict"]}  # fmt: skip
    return None


# -- calibration ------------------------------------------------------------------------------

_CALIBRATION = re.compile(r"```plan-calibration\n(.*?)```", re.S)


def calibration_points(results: Path) -> list[dict]:
    """GPU measurements to hold the planner to: every ``plan-calibration`` block (JSON:
    ``overrides``, ``measured_peak_gib`` as torch.cuda.max_memory_reserved reports it,
    ``tolerance``) in ``results/gpu_*.md`` (``tests/test_plan.py`` compares each)."""
    points = []
    for path in sorted(results.glob("gpu_*.md")):
        for block in _CALIBRATION.findall(path.read_text()):
            points.append({"file": path.name, **json.loads(block)})
    return points


# -- the plan ---------------------------------------------------------------------------------


def plan(overrides: list[str], a: Assumptions = Assumptions(), dry: dict | None = None) -> dict:
    cfg = compose_job(overrides)
    dry = dry or dry_run.resolve(overrides)
    costs = ActivationCosts.load(cfg.model, dry["groups"]["tp"])
    gpu_gib = cfg.cluster.gpu_memory_gib
    mem = memory(cfg, dry, costs, a, gpu_gib)
    peak = device_peak_tflops(cfg.cluster.gpu)
    vision, audio, _ = media_shares(cfg.data.blend)
    result = {
        "stage": cfg.stage.name,
        "cluster": dry["cluster"] | {"gpu": cfg.cluster.gpu},
        "groups": dry["groups"],
        "seq_length": cfg.trainer.seq_length,
        "recompute": asdict(cfg.recompute),
        "trainable": list(cfg.stage.trainable),
        "media_per_sequence": {
            "vision_tokens": cfg.trainer.seq_length * vision,
            "audio_tokens": cfg.trainer.seq_length * audio,
        },
        "encoder_shares": encoder_shares(cfg, a, dry["groups"]["tp"], dry["groups"]["cp"]),
        "memory": mem,
        "time": timing(cfg, dry["groups"], a, peak),
        "assumptions": asdict(a),
        "activation_costs": str(costs.path.name),
        "fix": None,
    }
    if mem["verdict"] == "does not fit":
        result["fix"] = smallest_fix(cfg, overrides, dry, costs, a, gpu_gib)
    return result


def fewest_nodes(overrides: list[str], a: Assumptions = Assumptions()) -> dict | None:
    """The fewest nodes (1, 2, 4, ... below the cluster's) on which the stage fits, with its TP
    and CP and the expert parallelism halved until ``EP x expert TP`` divides the world (fewer
    ranks hold more experts each); None when only the cluster's own size does. Each size is a
    dry run plus the memory estimate, as :func:`plan`."""
    cfg = compose_job(overrides)
    nodes, per_node = cfg.cluster.nodes, cfg.cluster.gpus_per_node
    if not nodes or not per_node:
        return None
    etp = cfg.parallel.expert_tp
    n = 1
    while n < nodes:
        world, ep = n * per_node, cfg.parallel.ep
        while ep > 1 and world % (ep * etp):
            ep //= 2
        extra = [f"cluster.nodes={n}", f"parallel.ep={ep}"]
        try:  # a layout the dry run's checks refuse (TP x CP over the world, the batch over DP)
            p = plan([*overrides, *extra], a)
        except ValueError:
            n *= 2
            continue
        if p["memory"]["verdict"] in ("fits", "tight"):
            return {"nodes": n, "ep": ep, "overrides": extra, "total_gib": p["memory"]["total_gib"],
                    "verdict": p["memory"]["verdict"], "step_s": p["time"].get("step_s"),
                    "gpu_hours": p["time"].get("gpu_hours")}  # fmt: skip
        n *= 2
    return None


def verdict_line(p: dict) -> str:
    m = p["memory"]
    gpu = f" of {m['gpu_gib']:.1f} GiB" if m["gpu_gib"] else ""
    line = f"plan: {p['stage']}: {m['total_gib']:.1f} GiB per rank{gpu}: {m['verdict']}"
    if p["fix"]:
        line += f"; smallest fix: {p['fix']['change']} -> {p['fix']['total_gib']:.1f} GiB"
    elif m["verdict"] == "does not fit":
        line += "; no single change found (see omni-train plan)"
    return line


def format_plan(p: dict) -> str:
    g, m, t = p["groups"], p["memory"], p["time"]
    media = p["media_per_sequence"]
    lines = [
        f"stage {p['stage']}  cluster {p['cluster']['name']} ({g['world']} x "
        f"{p['cluster']['gpu'] or 'GPU'})  TP {g['tp']} x CP {g['cp']} x DP {g['dp']}, "
        f"EP {g['ep']};  seq_length {p['seq_length']:,}",
        f"media per packed sequence (blend x media_mix.yaml): {media['vision_tokens']:,.0f} "
        f"vision tokens, {media['audio_tokens']:,.0f} audio tokens",
        "encoders sharded: "
        + "; ".join(
            f"{name} over {sh['group']} ranks (largest share {sh['imbalance']:.3f} x the mean)"
            for name, sh in p["encoder_shares"].items()
            if sh["group"] > 1 and media[f"{name}_tokens"] > 0
        )
        if any(sh["group"] > 1 for sh in p["encoder_shares"].values())
        else "encoders: one rank per sequence",
        "",
        f"{'per-rank memory':<34}{'GiB':>9}",
    ]
    for name, gib in m["parts_gib"].items():
        lines.append(f"  {name:<32}{gib:>9.2f}")
    gpu = f" / {m['gpu_gib']:.1f}" if m["gpu_gib"] else ""
    lines.append(f"  {'total':<32}{m['total_gib']:>9.2f}{gpu}   -> {m['verdict']}")
    if p["fix"]:
        lines.append(f"smallest fix: {p['fix']['change']} -> {p['fix']['total_gib']:.1f} GiB "
                     f"({p['fix']['verdict']})")  # fmt: skip
    elif m["verdict"] == "does not fit":
        lines.append("no candidate change (more recompute, larger CP, shorter sequences) fits")
    lines.append("")
    if t["step_s"] is None:
        lines.append(f"time: {t['hardware_tflop_per_rank_step']:.1f} TFLOP per rank per step "
                     "(no peak for this GPU: set cluster.gpu)")  # fmt: skip
    else:
        lines.append(
            f"time at {t['assumed_mfu']:.0%} MFU of {t['peak_tflops']:.0f} TFLOP/s: "
            f"{t['step_s']:.1f} s/step, {t['tokens_per_s']:,.0f} tokens/s, stage "
            f"{t['stage_hours']:.1f} h = {t['gpu_hours']:,.0f} GPU-hours"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    install_filters()  # an entry point: see omni_train.log.QUIET
    parser = argparse.ArgumentParser(prog="omni-train plan")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--verdict", action="store_true", help="one line (omni-train run)")
    parser.add_argument(
        "--fewest-nodes", action="store_true", help="also the fewest nodes it fits on (dry runs)"
    )
    for field, default in asdict(Assumptions()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args, overrides = parser.parse_known_args(argv)
    a = Assumptions(**{k: getattr(args, k) for k in asdict(Assumptions())})
    try:
        p = plan(overrides, a)
    except ValueError as e:
        print(f"omni-train plan: error: {e}", file=sys.stderr)
        return 2
    if args.fewest_nodes:
        p["fewest_nodes"] = fewest_nodes(overrides, a)
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        print(verdict_line(p) if args.verdict else format_plan(p))
    if args.fewest_nodes and not args.json:
        f = p["fewest_nodes"]
        print(f"fewest nodes: {f['nodes']} of {p['cluster']['nodes']} ({' '.join(f['overrides'])}"
              f"): {f['total_gib']:.1f} GiB per rank, {f['verdict']}" if f else
              f"fewest nodes: {p['cluster']['nodes']} (no smaller power of two fits)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
