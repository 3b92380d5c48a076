"""Sharded media encoders equal one process: loss and every gradient (run under torchrun).

One packed sequence of five samples holds images of three sizes, a 5-frame video then an image,
a clip of audio, audio inside a video (frames, clip, frames) and a two-clip stream, each sample
padded to a multiple of 16 (2 x CP x TP for every layout here). Training mode: the CPE's random
crop and the conformer's BatchNorm batch statistics are on.

``reference`` (1 process): loss sum, every parameter's gradient and the weights. A sharded layout
(N processes, ``parallel.*`` overrides) loads those weights, runs the same sequence with its CP
shard, sums gradients as training does (DDP over CP; SP norms over TP, as megatron's
``finalize_model_grads``; the audio encoder over TP, as
``omni_train.training.optimizer.finalize_grads``) and compares. Rank 0 writes ``MODE.json``.

Usage: torchrun --nproc-per-node N tests/encoder_shard_probe.py MODE OUT [overrides]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as mpu
from omni_probe import tiny_omni  # tests/ is this script's folder

from omni_train.data import tokens
from omni_train.data.loader import packed_seq_params
from omni_train.data.media import Media
from omni_train.parallel.context import shard_index
from omni_train.parallel.state import destroy_parallel
from omni_train.platform.kernels.cp_layout import position_owner

PAD = 16
COMPONENTS = ("llm", "vision_encoder", "vision_projector", "audio_encoder", "audio_projector")


def text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(20, 500, (n,), generator=g).tolist()


def sequence(cfg):
    """(tokens [1, s], labels [1, s], loss mask [1, s], media, packed params, item spans)."""
    g = torch.Generator().manual_seed(3)
    ids, a = cfg.model.media_tokens, cfg.model.audio
    img = [torch.randn(3, h, w, generator=g) for h, w in ((64, 96), (128, 32), (32, 64))]
    vid = [torch.randn(5, 3, 64, 64, generator=g), torch.randn(4, 3, 32, 64, generator=g)]
    wav = [torch.randn(int(s * 16000), generator=g) for s in (5, 3, 2.5, 1.2)]
    clip = lambda w: tokens.audio_clip_tokens(w.shape[0], a)  # noqa: E731
    half = tokens.video_groups(4) * tokens.grid_tokens(2, 4) // 2
    samples = [
        text(g, 3)
        + [ids.image] * tokens.grid_tokens(4, 6)
        + text(g, 4)
        + [ids.image] * tokens.grid_tokens(8, 2)
        + text(g, 5),
        text(g, 2)
        + [ids.image] * (tokens.video_groups(5) * tokens.grid_tokens(4, 4))
        + text(g, 6)
        + [ids.image] * tokens.grid_tokens(2, 4)
        + text(g, 2),
        text(g, 2) + [ids.audio] * clip(wav[0]) + text(g, 3),
        text(g, 2) + [ids.image] * half + [ids.audio] * clip(wav[1]) + [ids.image] * half
        + text(g, 4),
        text(g, 2) + [ids.audio] * (clip(wav[2]) + clip(wav[3])) + text(g, 3),
    ]  # fmt: skip
    media = Media(
        images=img,
        image_sample=[0, 0, 1],
        videos=vid,
        video_sample=[1, 3],
        audio=wav,
        audio_sample=[2, 3, 4, 4],
        vision_kinds=["image", "image", "video", "image", "video"],
    )
    xs, ys, ms, bounds = [], [], [], [0]
    for s in samples:
        x = torch.tensor([*s, text(g, 1)[0]])
        pad = -(len(s)) % PAD
        xs += [x[:-1], torch.ones(pad, dtype=torch.long)]
        ys += [x[1:], torch.ones(pad, dtype=torch.long)]
        ms += [torch.ones(len(s)), torch.zeros(pad)]
        bounds.append(bounds[-1] + len(s) + pad)
    cu = torch.tensor(bounds, dtype=torch.int32)
    params = packed_seq_params(cu, cu)
    return (torch.cat(xs)[None], torch.cat(ys)[None], torch.cat(ms)[None], media, params, cu)


def straddling_items(x: torch.Tensor, cu: torch.Tensor, cp: int, token_id: int) -> int:
    """How many runs of ``token_id`` placeholders span the positions of two CP ranks."""
    owner = position_owner(x.shape[1], cp, cu)
    runs, n, prev = [], 0, None
    for pos, t in enumerate(x[0].tolist()):
        if t == token_id:
            if prev != pos - 1:
                runs.append(set())
            runs[-1].add(int(owner[pos]))
            prev = pos
    for r in runs:
        n += len(r) > 1
    return n


def run(model, cfg) -> tuple[float, dict[str, torch.Tensor]]:
    x, y, mask, media, params, _ = sequence(cfg)
    cp_index = shard_index(x.shape[1], params)
    if cp_index is not None:
        y, mask = y.index_select(1, cp_index), mask.index_select(1, cp_index)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the CPE crops and the mel dither: one draw for every layout
    loss = model(x, labels=y, media=media, packed_seq_params=params, cp_index=cp_index)
    total = (loss * mask).sum()
    total.backward()
    total = total.detach()
    if mpu.get_context_parallel_world_size() > 1:
        dist.all_reduce(total, group=mpu.get_context_parallel_group())
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if mpu.get_context_parallel_world_size() > 1:  # megatron's DDP: over DP x CP
            dist.all_reduce(g, group=mpu.get_context_parallel_group())
        # megatron's finalize_model_grads sums SP norms over TP; finalize_grads, the audio encoder
        partial = getattr(p, "sequence_parallel", False) or getattr(p, "partial_over_tp", False)
        if partial and mpu.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(g, group=mpu.get_tensor_model_parallel_group())
        grads[name] = g
    return float(total), grads


def component_norms(model, grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Squared gradient norm per component over the whole model (TP shards added up,
    TP-replicated parameters counted once)."""
    tp_rank = mpu.get_tensor_model_parallel_rank()
    out = {}
    for comp in COMPONENTS:
        sq = torch.zeros((), dtype=torch.float64)
        for name, p in model.named_parameters():
            if name.split(".")[0] != comp:
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                sq += grads[name].double().square().sum()
        if mpu.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(sq, group=mpu.get_tensor_model_parallel_group())
        out[comp] = float(sq.sqrt())
    return out


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    out = Path(out)
    cfg, ps, model = tiny_omni(overrides)
    result: dict = {"mode": mode, "layout": ps.describe()}
    if mode == "reference":
        total, grads = run(model, cfg)
        result["loss_sum"] = total
        result["component_norms"] = component_norms(model, grads)
        result["num_parameters"] = len(grads)
        x, _, _, _, _, cu = sequence(cfg)
        ids = cfg.model.media_tokens
        result["straddling"] = {
            str(cp): [straddling_items(x, cu, cp, t) for t in (ids.image, ids.audio)]
            for cp in (2, 4)
        }
        torch.save(grads, out / "reference_grads.pt")
        (out / "weights").mkdir(exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(out / "weights"))
    else:
        loaded = dist_checkpointing.load(model.sharded_state_dict(), str(out / "weights"))
        model.load_state_dict(loaded)
        total, grads = run(model, cfg)
        ref = torch.load(out / "reference_grads.pt")
        result["loss_sum"] = total
        result["component_norms"] = component_norms(model, grads)
        diffs = {}
        for name, p in model.named_parameters():  # whole tensors on this rank: compare all
            if getattr(p, "tensor_model_parallel", False) and ps.tp > 1:
                continue
            want = ref[name]
            scale = float(want.abs().max()) or 1.0
            diffs[name] = float((grads[name] - want).abs().max()) / scale
        result["grad_max_rel_diff"] = diffs
        result["zero_reference_grads"] = [n for n in diffs if float(ref[n].abs().max()) == 0]
    if ps.is_main:
        (out / f"{mode}.json").write_text(json.dumps(result, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
