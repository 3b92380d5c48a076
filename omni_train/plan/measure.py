"""Activation memory per layer kind, measured: what autograd keeps after the forward pass, and
the transient peak above it during forward + backward.

How (issue #21). The real omni model is built at the requested width (bf16, megatron-core's
layers on the CPU platform, the stage's tensor parallel size) but with few layers, and run on a
synthetic micro-batch under :class:`LiveBytes` (a ``TorchDispatchMode`` that follows every
tensor storage): *saved* is the activation memory alive once the forward has returned (the
per-token loss included), *transient* the highest activation + temporary memory seen during
forward and backward, minus *saved*. A layer kind's cost is the difference between two models
that differ by one layer of that kind, so whatever the layer keeps (its ``save_for_backward``
tensors, the inputs a checkpointed region holds, router state) is counted once, and nothing
else is:

* LM kinds (``M``, ``*``, ``E``, ``-``): pattern ``X + k`` minus pattern ``X`` (``X`` the
  model's first layer symbol), text-only, at ``S`` tokens; the LM *head* (embedding, final
  norm, output layer, loss) is pattern ``X`` minus one ``X`` layer. Measured with the LM
  trainable and frozen (then only the embedding table trains, standing in for a projector
  upstream: gradients still flow through every layer, as in stages 0 and 2), with and without
  the stage's selective recompute.
* ViT block: a 2-layer minus a 1-layer ViT on one image of ``n`` patches; *vision rest* (patch
  and position embedding, pixel shuffle, projector, splice) the 1-layer model minus the same
  LM on the same number of text tokens. Trainable or frozen, with and without recompute.
* Conformer layer and *audio rest* (mel front end, subsampling, projector) likewise, on one
  clip of ``n`` encoder frames.

The values depend on the platform's kernels where they differ: the CPU stand-in for packed
attention (one image through the ViT is a packed sequence) saves a boolean ``[n, n]`` mask that
TE's fused attention does not; :mod:`omni_train.plan.costs` keeps such terms apart.

Run: ``torchrun --nproc-per-node TP -m omni_train.plan.measure --model NAME --out FILE.json``
(``make activation-costs``); rank 0 writes the points.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from omni_train.config import compose_job
from omni_train.config.training import RECOMPUTE_LM_MODULES
from omni_train.data import tokens
from omni_train.data.media import Media
from omni_train.log import install_filters
from omni_train.model.assembly import build_model
from omni_train.parallel.state import destroy_parallel, init_parallel
from omni_train.plan.costs import model_key
from omni_train.platform import setup

GROUPS = ("lm", "mamba_kernel", "vision", "audio")


@dataclass(frozen=True)
class Setting:
    """One measured configuration of one group of kinds."""

    group: str  # lm | vision | audio
    recompute: bool  # the component's recompute (LM: the stage's selective modules)
    trainable: bool  # the component trains (else frozen, gradients through it where needed)
    projector_recompute: bool = False  # vision/audio only

    @property
    def key(self) -> str:
        text = f"rc={'on' if self.recompute else 'off'}|{'train' if self.trainable else 'frozen'}"
        if self.group != "lm":
            text += f"|proj_rc={'on' if self.projector_recompute else 'off'}"
        return text


def settings(group: str) -> list[Setting]:
    if group == "lm":
        return [Setting("lm", rc, tr) for rc in (False, True) for tr in (True, False)]
    # a frozen encoder keeps nothing (no gradient is needed through it): recompute is moot
    trained = [Setting(group, rc, True, prc) for rc in (True, False) for prc in (True, False)]
    return trained + [Setting(group, False, False, prc) for prc in (True, False)]


# -- one measurement -------------------------------------------------------------------------


class LiveBytes:
    """Bytes of every tensor storage created while active, alive now and at their peak.

    A ``TorchDispatchMode`` sees each op's outputs; a weak reference on each new storage
    subtracts it again when it is freed (the bookkeeping of torch's ``MemTracker``, without
    its module and gradient hooks, which keep every hooked parameter alive after it exits).
    Storages that exist on entry (weights, buffers, the batch) are never counted, nor are
    views of them. Parameter gradients are dropped as soon as they are accumulated, as
    megatron's DDP moves them into its preallocated gradient buffer (planned separately).
    """

    def __init__(self, model: torch.nn.Module, *inputs: torch.Tensor):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._add(out)
                return out

        self.mode = Mode()
        self.known = WeakIdKeyDictionary()
        self.hooked = WeakIdKeyDictionary()
        self.held = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0
        for t in [*model.parameters(), *model.buffers(), *inputs]:
            self.known[t.untyped_storage()] = None
        self.hooks = [
            p.register_post_accumulate_grad_hook(_drop_grad)
            for p in model.parameters()
            if p.requires_grad
        ]

    def _add(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            if st in self.known:
                continue
            size = st.nbytes()
            self.known[st] = weakref.ref(st, functools.partial(self._free, size))
            self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, size: int, _ref) -> None:
        self.current -= size

    @contextlib.contextmanager
    def saved_tensors(self) -> Iterator[None]:
        """Inside: autograd's saved-tensor hooks record, each storage once, the new storages
        saved for backward (``hooked_bytes``) and the pre-existing ones it holds (``held``):
        a cross-check of ``current``, which also sees what is kept outside autograd."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st in self.known and self.known[st] is None:  # a weight or an input
                self.held[st] = True
            else:
                self.hooked[st] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    @property
    def hooked_bytes(self) -> int:
        return sum(self.hooked.values())

    def __enter__(self) -> LiveBytes:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        for h in self.hooks:
            h.remove()


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def measure(model, tokens: torch.Tensor, media, num_repeats: int = 2) -> tuple[int, int, int]:
    """(saved, transient, hooked) bytes of one forward + backward of ``model`` on ``tokens
    [1, s]``. *hooked*: the storages autograd's saved-tensor hooks see (each once), a cross-check
    of *saved*; it misses what torch's non-reentrant checkpoint keeps (the region's inputs,
    held by its closure), which *saved* counts.

    The smallest of ``num_repeats`` readings, field by field: the noise is one-sided (a storage
    that outlives its step for a reason outside the model only adds bytes). A CI run of the suite
    once read 312 B for a frozen conformer layer that keeps nothing (0 B in every run alone)."""
    runs = [_measure_once(model, tokens, media) for _ in range(num_repeats)]
    return tuple(min(r[i] for r in runs) for i in range(3))


def _measure_once(model, tokens: torch.Tensor, media) -> tuple[int, int, int]:
    labels = torch.roll(tokens, -1, dims=1)
    gc.collect()
    pixels = [*media.images, *media.videos, *media.audio] if media is not None else []
    # No cyclic collection inside the measurement: when one runs is not fixed between runs,
    # and one mid-forward freed a few hundred bytes of cyclic garbage in one run of the suite
    # and not in others (tests/test_plan.py's 5 % check at tiny sizes failed once).
    gc.disable()
    try:
        with LiveBytes(model, tokens, labels, *pixels) as live:
            with live.saved_tensors():
                loss = model(input_ids=tokens, labels=labels, media=media)
            saved, hooked = live.current, live.hooked_bytes
            loss.float().sum().backward()
            del loss
    finally:
        gc.enable()
    model.zero_grad(set_to_none=True)
    return saved, max(live.peak - saved, 0), hooked


def _minus(a: list, b: list, transient: bool = False) -> list:
    """Row ``a - b`` ([n, saved, transient, hooked]); the transient is ``a``'s or 0."""
    return [a[0], a[1] - b[1], a[2] if transient else 0, a[3] - b[3]]


# -- models and batches ----------------------------------------------------------------------


def _lm_recompute(on: bool) -> str:
    return f"recompute.lm=[{','.join(RECOMPUTE_LM_MODULES)}]" if on else "recompute.lm=[]"


def _contiguous_frozen_linear_backward() -> None:
    """megatron's frozen-weight linear multiplies the output gradient as it comes, here a
    ``[s, 1, V/tp]`` view of a ``[1, s, V/tp]`` tensor; PyTorch's CPU bf16 matmul takes a
    non-BLAS path for that layout, over 100x slower (a full-vocabulary output layer: minutes
    per step). For the measurement only, the same product on the 2-D view (no copy when the
    micro-batch is one sequence, as here): the saved tensors are untouched."""
    from megatron.core.tensor_parallel.layers import LinearWithFrozenWeight

    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        flat = grad_output.reshape(-1, grad_output.shape[-1])
        grad_input = flat.matmul(weight).view(*grad_output.shape[:-1], weight.shape[-1])
        if ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        return grad_input, None, None, None, None

    LinearWithFrozenWeight.backward = staticmethod(backward)


def _no_experts(pattern: str) -> list[str]:
    return [] if "E" in pattern else ["model.num_moe_experts=0"]


class Probe:
    """Builds the variants of one model at one tensor-parallel size in one process group."""

    def __init__(self, model: str, tp: int, extra: list[str]):
        self.base = [
            "stage=stage4_omni_sft_16k",
            f"model={model}",
            "cluster=local",
            f"parallel.tp={tp}",
            f"parallel.sp={str(tp > 1).lower()}",
            "parallel.cp=1",
            "parallel.ep=1",
            "trainer.precision=bf16",
            "recompute.vision_encoder=false",
            "recompute.audio_encoder=false",
            "recompute.projectors=false",
            *extra,
        ]
        self.cfg = compose_job(self.base)
        self.tp = tp
        self.warm = False
        self.platform = setup()
        _contiguous_frozen_linear_backward()
        self.ps = init_parallel(self.cfg.parallel, self.platform, self.cfg.trainer.seed)

    def build(self, overrides: list[str], trainable: list[str], embedding_trains: bool = False):
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        cfg = compose_job([*self.base, *overrides, f"stage.trainable=[{','.join(trainable)}]"])
        # megatron sizes its per-layer aux-loss log by the first MoE model's depth
        get_moe_layer_wise_logging_tracker().clear()
        torch.manual_seed(cfg.trainer.seed)
        built = build_model(cfg, self.ps, self.platform)
        model = built.module
        if embedding_trains:  # a trainable input upstream of a frozen LM (a projector's place)
            model.llm.embedding.word_embeddings.weight.requires_grad_(True)
        model.train()
        return cfg, model

    def warm_up(self, model, tokens: torch.Tensor, media) -> None:
        """One untracked step at the largest size, once per process: buffers megatron keeps
        for the whole run (the sequence-parallel all-gather buffer) are then
        allocated before any measurement, instead of inside whichever variant asks first.
        They are a fixed cost of the run, not of a layer."""
        if not self.warm:
            measure(model, tokens, media, num_repeats=1)
            self.warm = True

    def text(self, cfg, length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(length)
        return torch.randint(20, cfg.model.vocab_size, (1, length), generator=g)

    def pad(self, ids: list[int]) -> list[int]:
        """Text after the media up to a multiple of the TP size (sequence parallel)."""
        return ids + [21] * (-(len(ids) + 16) % self.tp + 16)


def _image_batch(probe: Probe, cfg, patches: int):
    v = cfg.model.vision
    rows = int(patches**0.5) // 2 * 2
    cols = patches // rows // 2 * 2
    g = torch.Generator().manual_seed(patches)
    image = torch.randn(3, rows * v.patch_size, cols * v.patch_size, generator=g)
    ids = probe.pad([20] + [cfg.model.media_tokens.image] * tokens.grid_tokens(rows, cols))
    return torch.tensor([ids]), Media(images=[image], image_sample=[0]), rows * cols


def _audio_batch(probe: Probe, cfg, frames: int):
    a = cfg.model.audio
    num_samples = frames * a.subsampling_factor * a.hop_samples
    g = torch.Generator().manual_seed(frames)
    wav = torch.randn(num_samples, generator=g) * 0.1
    n = tokens.audio_clip_tokens(num_samples, a)  # one clip, one encoder input
    ids = probe.pad([20] + [cfg.model.media_tokens.audio] * n)
    return torch.tensor([ids]), Media(audio=[wav], audio_sample=[0]), n


# -- the groups ------------------------------------------------------------------------------


def measure_lm(probe: Probe, lengths: list[int], log) -> dict:
    """points[kind][setting] = [[tokens, saved, transient, hooked], ...] per rank."""
    m = probe.cfg.model
    first = m.hybrid_pattern[0]
    kinds = sorted(set(m.hybrid_pattern))
    raw: dict[str, dict[str, list]] = {}
    for s in settings("lm"):
        for pattern in [first, *(first + k for k in kinds)]:
            overrides = [
                f"model.hybrid_pattern='{pattern}'",
                "model.vision=null",
                "model.audio=null",
                _lm_recompute(s.recompute),
                *_no_experts(pattern),
            ]
            t0 = time.time()
            cfg, model = probe.build(overrides, ["llm"] if s.trainable else [], not s.trainable)
            probe.warm_up(model, probe.text(cfg, max(lengths)), None)
            for n in lengths:
                row = [n, *measure(model, probe.text(cfg, n), None)]
                raw.setdefault(pattern, {}).setdefault(s.key, []).append(row)
            del model
            log(f"lm {pattern:3s} {s.key:18s} {time.time() - t0:6.1f} s")
    out: dict[str, dict[str, list]] = {"head": {}, "transient": {}}
    for s in settings("lm"):
        base = raw[first][s.key]
        for k in kinds:
            rows = raw[first + k][s.key]
            out.setdefault(k, {})[s.key] = [_minus(a, b) for a, b in zip(rows, base, strict=True)]
        layer = out[first][s.key]
        out["head"][s.key] = [_minus(b, x, True) for b, x in zip(base, layer, strict=True)]
        # the transient peak of a stack: the largest of its variants'
        transient = [max(raw[p][s.key][i][2] for p in raw) for i in range(len(lengths))]
        out["transient"][s.key] = [[n, 0, t, 0] for n, t in zip(lengths, transient, strict=True)]
    return out


def measure_whole_lm(probe: Probe, lengths: list[int], log) -> dict:
    """The model's own LM pattern, text only: what the per-kind costs must add up to."""
    out: dict[str, list] = {}
    for s in settings("lm"):
        cfg, model = probe.build([_lm_recompute(s.recompute), "model.vision=null",
                                  "model.audio=null"], ["llm"] if s.trainable else [],
                                 not s.trainable)  # fmt: skip
        out[s.key] = [[n, *measure(model, probe.text(cfg, n), None)] for n in lengths]
        del model
        log(f"whole lm {s.key}")
    return {"whole_lm": out}


def measure_mamba_kernel(probe: Probe, lengths: list[int], log) -> dict:
    """The Mamba mixer's scan kernel alone, as this platform provides it (megatron's
    ``mamba_split_conv1d_scan_combined``), at one rank's shapes: the bytes its autograd graph
    keeps beyond its inputs (saved-tensor hooks). A plan for mamba-ssm's fused kernel swaps this
    part of the measured ``M`` layer for what that kernel keeps (:mod:`omni_train.plan.costs`)."""
    from megatron.core.ssm import mamba_mixer

    m, tp = probe.cfg.model, probe.tp
    heads, groups = m.mamba_num_heads // tp, m.mamba_num_groups // tp
    d_inner, bc = heads * m.mamba_head_dim, 2 * groups * m.mamba_state_dim
    rows, inputs_kept = [], []
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        bf16 = torch.bfloat16
        zxbcdt = torch.randn(1, n, 2 * d_inner + bc + heads, generator=g).to(bf16)
        weight = (torch.randn(d_inner + bc, m.mamba_conv_kernel, generator=g) * 0.1).to(bf16)
        bias = torch.zeros(d_inner + bc, dtype=bf16)
        dt_bias, d, a = torch.zeros(heads), torch.ones(heads), -torch.ones(heads)
        for t in (zxbcdt, weight, bias, dt_bias, d, a):
            t.requires_grad_()
        inputs = (zxbcdt, weight, bias, dt_bias, a, d)
        with LiveBytes(torch.nn.Module(), *inputs) as live:
            with live.saved_tensors():
                y = mamba_mixer.mamba_split_conv1d_scan_combined(
                    *inputs, chunk_size=128, activation="silu", headdim=m.mamba_head_dim,
                    ngroups=groups, norm_before_gate=False,
                )  # fmt: skip
            kept = live.hooked_bytes
            # does the graph keep the kernel's input alive (mamba-ssm's does)?
            held = zxbcdt.untyped_storage().nbytes() if zxbcdt.untyped_storage() in live.held else 0
            y.float().sum().backward()
        rows.append([n, kept, max(live.peak - kept, 0), kept])
        inputs_kept.append([n, held, 0, held])
    log("mamba kernel")
    return {"mamba_kernel": {"kernel": rows, "input": inputs_kept}}


def measure_encoder(probe: Probe, group: str, sizes: list[int], log) -> dict:
    """Per setting: the encoder layer and the rest (embedding, front end, projector)."""
    m = probe.cfg.model
    first = m.hybrid_pattern[0]
    layer_key = "vit_block" if group == "vision" else "conformer_layer"
    encoder, projector = f"{group}_encoder", f"{group}_projector"
    other = "audio" if group == "vision" else "vision"
    batch = _image_batch if group == "vision" else _audio_batch
    common = [f"model.hybrid_pattern='{first}'", "model.vocab_size=1024", f"model.{other}=null",
              _lm_recompute(True), *_no_experts(first)]  # fmt: skip
    out: dict[str, dict[str, list]] = {layer_key: {}, f"{group}_rest": {}, f"{group}_transient": {}}
    for s in settings(group):
        trainable = ["llm", projector] + ([encoder] if s.trainable else [])
        flags = [
            f"recompute.{encoder}={str(s.recompute).lower()}",
            f"recompute.projectors={str(s.projector_recompute).lower()}",
        ]
        rows = {}
        t0 = time.time()
        for depth in (1, 2):
            cfg, model = probe.build(
                [*common, *flags, f"model.{group}.num_layers={depth}"], trainable
            )
            probe.warm_up(model, *batch(probe, cfg, max(sizes))[:2])
            for n in sizes:
                ids, media, _ = batch(probe, cfg, n)
                rows.setdefault(depth, []).append([n, *measure(model, ids, media)])
                if depth == 1:  # the same LM on as many text tokens
                    rows.setdefault(0, []).append(
                        [n, *measure(model, probe.text(cfg, ids.shape[1]), None)]
                    )
            del model
        for one, two, text in zip(rows[1], rows[2], rows[0], strict=True):
            layer = _minus(two, one)
            out[layer_key].setdefault(s.key, []).append(layer)
            out[f"{group}_rest"].setdefault(s.key, []).append(_minus(_minus(one, layer), text))
            out[f"{group}_transient"].setdefault(s.key, []).append([one[0], 0, two[2], 0])
        log(f"{group} {s.key:32s} {time.time() - t0:6.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    install_filters()  # an entry point: see omni_train.log.QUIET
    parser = argparse.ArgumentParser(prog="python -m omni_train.plan.measure")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--lm-tokens", default="1024,2048,4096")
    parser.add_argument("--vit-patches", default="1024,2048,4096")
    parser.add_argument("--audio-frames", default="125,250,375")
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--whole-lm", default="", help="also the whole LM at these lengths")
    args, extra = parser.parse_known_args(argv)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    probe = Probe(args.model, tp, extra)
    rank0 = int(os.environ.get("RANK", "0")) == 0

    def log(text: str) -> None:
        if rank0:
            print(f"[measure] {text}", flush=True)

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    points: dict[str, dict] = {}
    started = time.time()
    groups = args.groups.split(",")
    if "lm" in groups:
        points.update(measure_lm(probe, ints(args.lm_tokens), log))
    if "mamba_kernel" in groups and "M" in probe.cfg.model.hybrid_pattern:
        points.update(measure_mamba_kernel(probe, ints(args.lm_tokens), log))
    if args.whole_lm:
        points.update(measure_whole_lm(probe, ints(args.whole_lm), log))
    if "vision" in groups and probe.cfg.model.vision is not None:
        points.update(measure_encoder(probe, "vision", ints(args.vit_patches), log))
    if "audio" in groups and probe.cfg.model.audio is not None:
        points.update(measure_encoder(probe, "audio", ints(args.audio_frames), log))
    if rank0:
        record = {
            "model": model_key(probe.cfg.model),
            "model_name": probe.cfg.model.name,
            "tp": tp,
            "sequence_parallel": tp > 1,
            "precision": "bf16",
            "platform": "cpu",
            "torch": torch.__version__,
            "seconds": round(time.time() - started, 1),
            "points": points,
        }
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        log(f"wrote {args.out} in {record['seconds']} s")

    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
