"""Checks of the tiny omni model that need real processes (run under torchrun by the tests).

``reference`` (1 process): mixed-media forward/backward, placeholder-mismatch errors, then the
eval-mode logits of a fixed mixed batch and the per-token losses of 3 samples run one by one,
plus the weights they came from.
``tp2`` (2 processes, TP=2 + SP): load those weights, recompute the logits, and run the 3
samples as one packed (THD) sequence. Rank 0 writes ``result.json`` into OUT.

Usage: torchrun --nproc-per-node N tests/omni_probe.py MODE OUT [overrides]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from omni_train.config import compose_job
from omni_train.data import tokens
from omni_train.data.loader import packed_seq_params
from omni_train.data.media import Media
from omni_train.model.assembly import build_model
from omni_train.parallel.state import destroy_parallel, init_parallel
from omni_train.platform import setup


def text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(20, 500, (n,), generator=g).tolist()


def mixed_batch(cfg) -> tuple[torch.Tensor, torch.Tensor, Media]:
    """6 rows: text only; 2 images of different aspect ratios; a 5-frame (odd) video followed
    by an image (video frames fill image placeholders, so the order matters); a 5 s clip; a
    70 s stream as 3 clips (30 + 30 + 10 s, the report layout); audio + video interleaved."""
    g = torch.Generator().manual_seed(0)
    ids, a = cfg.model.media_tokens, cfg.model.audio
    img1, img2 = torch.randn(3, 64, 96, generator=g), torch.randn(3, 128, 32, generator=g)
    img3 = torch.randn(3, 32, 64, generator=g)
    vid, vid2 = torch.randn(5, 3, 64, 64, generator=g), torch.randn(4, 3, 32, 64, generator=g)
    a5, a70, a3 = (torch.randn(int(s * 16000), generator=g) for s in (5, 70, 3))
    a70 = list(torch.split(a70, tokens.audio_clip_samples(a70.shape[0], a)))
    clip = lambda w: tokens.audio_clip_tokens(w.shape[0], a)  # noqa: E731
    n_vid2 = tokens.video_groups(4) * tokens.grid_tokens(2, 4)
    rows = [
        text(g, 40),
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
        text(g, 2) + [ids.audio] * clip(a5) + text(g, 3),
        text(g, 2) + [ids.audio] * sum(clip(c) for c in a70) + text(g, 3),
        text(g, 2)
        + [ids.image] * (n_vid2 // 2)
        + [ids.audio] * clip(a3)
        + [ids.image] * (n_vid2 // 2)
        + text(g, 4),
    ]
    s = max(len(r) for r in rows) + 1
    s += (s - 1) % 2  # an even length: sequence parallel splits it over TP=2
    x = torch.tensor([r + [1] * (s - len(r)) for r in rows])
    media = Media(
        images=[img1, img2, img3],
        image_sample=[1, 1, 2],
        videos=[vid, vid2],
        video_sample=[2, 5],
        audio=[a5, *a70, a3],
        audio_sample=[3, 4, 4, 4, 5],
        sample_names=["text", "images", "video+image", "audio5s", "audio70s", "audio+video"],
        vision_kinds=["image", "image", "video", "image", "video"],
    )
    return x[:, :-1].contiguous(), x[:, 1:].contiguous(), media


def three_samples(cfg) -> list[tuple[torch.Tensor, torch.Tensor, Media]]:
    """Text only; one image; audio + video. Each: (tokens [1, L], labels [1, L], media)."""
    g = torch.Generator().manual_seed(1)
    ids, a = cfg.model.media_tokens, cfg.model.audio
    img = torch.randn(3, 64, 32, generator=g)
    vid, wav = torch.randn(3, 3, 32, 32, generator=g), torch.randn(16000 * 2, generator=g)
    seqs = [
        (text(g, 23), Media()),
        (
            text(g, 4) + [ids.image] * tokens.grid_tokens(4, 2) + text(g, 9),
            Media(images=[img], image_sample=[0]),
        ),
        (
            text(g, 3)
            + [ids.image] * (tokens.video_groups(3) * tokens.grid_tokens(2, 2))
            + [ids.audio] * tokens.audio_clip_tokens(wav.shape[0], a)
            + text(g, 7),
            Media(videos=[vid], video_sample=[0], audio=[wav], audio_sample=[0]),
        ),
    ]
    out = []
    for ids_, media in seqs:
        x = torch.tensor(ids_ + [text(g, 1)[0]])
        out.append((x[None, :-1], x[None, 1:], media))
    return out


def pack(samples, multiple: int):
    """Concatenate into one THD sequence padded to ``multiple`` (SP needs a multiple of TP)."""
    xs = torch.cat([s[0] for s in samples], dim=1)
    ys = torch.cat([s[1] for s in samples], dim=1)
    lengths = [s[0].shape[1] for s in samples]
    pad = -xs.shape[1] % multiple
    xs = torch.cat([xs, torch.ones(1, pad, dtype=xs.dtype)], dim=1)
    ys = torch.cat([ys, torch.ones(1, pad, dtype=ys.dtype)], dim=1)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    cu_padded = torch.cat([cu[:-1], torch.tensor([xs.shape[1]], dtype=torch.int32)])
    params = packed_seq_params(cu, cu_padded)  # the loader's THD description
    media = Media(sample_names=["text", "image", "audio+video"])
    for k, (_, _, m) in enumerate(samples):
        media.images += m.images
        media.image_sample += [k] * len(m.images)
        media.videos += m.videos
        media.video_sample += [k] * len(m.videos)
        media.audio += m.audio
        media.audio_sample += [k] * len(m.audio)
        media.vision_kinds += m.vision_kinds
    return xs, ys, media, params, lengths


def reference(model, cfg, out: Path, result: dict) -> None:
    x, y, media = mixed_batch(cfg)
    model.train()
    loss = model(x, labels=y, media=media)
    loss.mean().backward()
    result["mixed_loss"] = float(loss.detach().mean())
    result["mixed_loss_finite"] = bool(torch.isfinite(loss).all())
    result["grad_abs_sum"] = {
        name: sum(float(p.grad.abs().sum()) for p in comp.parameters() if p.grad is not None)
        for name, comp in model.components().items()
    }
    result["params_without_grad"] = [n for n, p in model.named_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)

    errors = {}
    bad = x.clone()
    bad[1, 1] = cfg.model.media_tokens.image  # one image placeholder too many (a text slot)
    for what, tokens_, m in (
        ("extra_image_placeholder", bad, media),
        ("audio_without_placeholders", x[:1], Media(audio=[torch.zeros(16000)], audio_sample=[0])),
    ):
        try:
            model(tokens_, labels=y[: tokens_.shape[0]], media=m)
            errors[what] = None
        except ValueError as e:
            errors[what] = str(e)
    result["errors"] = errors

    # Row 2 holds a video, then an image: the image's placeholders get the image's features.
    model.eval()
    with torch.no_grad():
        row = Media(images=[media.images[2]], image_sample=[0], videos=[media.videos[0]],
                    video_sample=[0], vision_kinds=["video", "image"])  # fmt: skip
        emb = model.embed(x[2:3], row, None)[:, 0]  # [s, h]
        alone = model.vision_encoder.encode([media.images[2]], [])[0][0]
        want = model._project(model.vision_projector, alone)
        where = (x[2] == cfg.model.media_tokens.image).nonzero().flatten()[-want.shape[0] :]
        result["image_after_video_in_place"] = torch.allclose(emb[where], want, atol=1e-5)
    model.train()

    # CPE: random crop in training mode, deterministic with the part in eval mode.
    enc = model.vision_encoder
    grid = (4 * enc.patch_dim, 6 * enc.patch_dim)
    result["cpe_random_in_train"] = not torch.equal(
        enc.get_pos_enc(1, input_size=grid), enc.get_pos_enc(1, input_size=grid)
    )
    model.set_eval_parts(["vision_encoder.cpe"])
    train_pos = enc.get_pos_enc(1, input_size=grid)
    model.eval()
    result["cpe_eval_part_equals_eval"] = torch.equal(
        train_pos, enc.get_pos_enc(1, input_size=grid)
    )
    model.set_eval_parts([])
    with torch.no_grad():
        logits = model(x, media=media, runtime_gather_output=True)
        per_sample = [model(a, labels=b, media=m)[0] for a, b, m in three_samples(cfg)]
    torch.save({"logits": logits, "per_sample": per_sample}, out / "reference.pt")
    (out / "weights").mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(out / "weights"))


def tp2(model, cfg, out: Path, result: dict, ps) -> None:
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(out / "weights"))
    model.load_state_dict(loaded)
    ref = torch.load(out / "reference.pt")
    x, _, media = mixed_batch(cfg)
    model.eval()
    with torch.no_grad():
        logits = model(x, media=media, runtime_gather_output=True)
        xs, ys, pmedia, params, lengths = pack(three_samples(cfg), ps.tp)
        packed = model(xs, labels=ys, media=pmedia, packed_seq_params=params)[0]
    scale = ref["logits"].abs().max()
    result["logits_max_rel_diff"] = float((logits - ref["logits"]).abs().max() / scale)
    diffs, start = [], 0
    for n, want in zip(lengths, ref["per_sample"], strict=True):
        got = packed[start : start + n]
        diffs.append(float((got - want).abs().max() / want.abs().max()))
        start += n
    result["packed_per_token_loss_max_rel_diff"] = diffs
    result["packed_lengths"] = lengths


def tiny_omni(overrides: list[str]):
    """(cfg, parallel state, model): the tiny omni model in fp32 with every component
    trainable, on this process's layout (``overrides``: e.g. ``parallel=tp2``)."""
    cfg = compose_job(
        [
            "model=tiny",
            "trainer.precision=fp32",
            "stage.trainable=[llm,vision_encoder,vision_projector,audio_encoder,audio_projector]",
            *overrides,
        ]
    )
    platform = setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    return cfg, ps, build_model(cfg, ps, platform).module


def main() -> None:
    mode, out, *overrides = sys.argv[1:]
    out = Path(out)
    cfg, ps, model = tiny_omni(overrides)
    result: dict = {"mode": mode, "layout": ps.describe()}
    if mode == "reference":
        reference(model, cfg, out, result)
    else:
        tp2(model, cfg, out, result, ps)
    if ps.is_main:
        (out / f"{mode}.json").write_text(json.dumps(result, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
