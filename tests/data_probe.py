"""Energon data checks inside real ranks (torchrun, gloo). Launched by tests/test_energon_data.py.

    data_probe.py blends  ROOT OUT   every stage blend: 2 ranks -> well-formed, disjoint batches
    data_probe.py restore ROOT OUT   loader state after k steps restores the identical batch
    data_probe.py epoch   DATA OUT N one epoch (N batches) of a dataset with bad samples
    data_probe.py encoders ROOT OUT  every synthetic sample through the tiny model's real
                                     encoders: features per item == placeholders (1 rank)
    data_probe.py packed DATA OUT    one pass over a dataset with bad samples, packed with
                                     global balance: the bins each rank trains on

Each rank writes ``OUT/<mode>_rank<r>.json``; the test reads and asserts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from omni_train.config import blends, compose_job
from omni_train.data import tokens
from omni_train.data.loader import EnergonBatches

BASE = [
    "stage=smoke_omni",
    "model=tiny",
    "trainer.micro_batch_size=2",
    "data.packing.enabled=false",
]


def stream(root: str, out: str, *overrides: str, gbs: int = 4) -> EnergonBatches:
    cfg = compose_job(
        [
            *BASE,
            f"trainer.global_batch_size={gbs}",
            f"data.synthetic_root={root}",
            f"checkpoint.output_dir={out}",
            *overrides,
        ]
    )
    r, w = dist.get_rank(), dist.get_world_size()
    return EnergonBatches(cfg, dp_size=w, dp_rank=r, dp_group=dist.group.WORLD, device="cpu")


def check_batch(batch: dict, cfg) -> None:
    """Placeholders per row and modality == the accounting of that row's media."""
    media, ids = batch.media, batch.tokens
    v, a = cfg.model.vision, cfg.model.audio
    for row in range(ids.shape[0]):
        img = [x for x, o in zip(media.images, media.image_sample, strict=True) if o == row]
        vid = [x for x, o in zip(media.videos, media.video_sample, strict=True) if o == row]
        aud = [x for x, o in zip(media.audio, media.audio_sample, strict=True) if o == row]
        p = v.patch_size
        want_img = sum(tokens.grid_tokens(x.shape[1] // p, x.shape[2] // p) for x in img)
        want_vid = sum(
            tokens.video_groups(x.shape[0], True, v.tubelet_frames)
            * tokens.grid_tokens(x.shape[2] // p, x.shape[3] // p)
            for x in vid
        )
        want_aud = sum(tokens.audio_clip_tokens(x.shape[0], a) for x in aud)  # one input each
        ids_ = cfg.model.media_tokens
        got = [int((ids[row] == t).sum()) for t in (ids_.image, ids_.audio)]
        # video frames fill image placeholders (the released layout)
        assert got == [want_img + want_vid, want_aud], (row, got, want_img, want_vid, want_aud)
        real = batch.loss_mask[row].sum()
        assert real > 0  # every sample has assistant tokens


def blends_mode(root: str, out: str) -> dict:
    result = {}
    for name in blends.available_blends():
        data = stream(root, out, f"data.blend={name}", "data.num_workers=0")
        keys, cats = [], set()
        for _ in range(6):
            batch = next(data)
            check_batch(batch, data.cfg)
            keys += batch.media.sample_names
            cats |= set(batch.categories)
        result[name] = {"keys": keys, "categories": sorted(cats)}
    return result


def restore_mode(root: str, out: str) -> dict:
    args = ("data.blend=stage4", "data.num_workers=1")
    first = stream(root, out, *args)
    for _ in range(3 * first.num_microbatches):  # three optimizer steps
        next(first)
    first.end_step()
    common, rank = first.state_dict(), first.rank_state()
    want = [next(first) for _ in range(2)]
    again = stream(root, out, *args)
    again.load_state_dict(common, rank)
    got = [next(again) for _ in range(2)]
    same = all(
        torch.equal(getattr(w, k), getattr(g, k))
        for w, g in zip(want, got, strict=True)
        for k in ("tokens", "labels", "loss_mask")
    )

    def same_items(w: list, g: list) -> bool:
        return len(w) == len(g) and all(torch.equal(x, y) for x, y in zip(w, g, strict=True))

    same_media = all(
        same_items(getattr(w.media, kind), getattr(g.media, kind))
        for w, g in zip(want, got, strict=True)
        for kind in ("images", "videos", "audio")
    )
    return {
        "same_tokens": same,
        "same_media": same_media,
        "keys": [w.media.sample_names for w in want],
        "restored_keys": [g.media.sample_names for g in got],
        "totals": common,
    }


def epoch_mode(data: str, out: str, num_batches: str) -> dict:
    s = stream(
        "unused",
        out,
        f"data.path={data}",
        "data.blend=null",
        "data.num_workers=0",
        "data.shuffle_buffer_size=0",
        "data.max_samples_per_sequence=0",
        "data.max_skip_fraction=1.0",
        "trainer.seq_length=512",
    )
    keys = []
    for _ in range(int(num_batches)):
        keys += next(s).media.sample_names
    s.end_step()
    return {"keys": keys, "totals": s.state_dict()}


def packed_mode(data: str, out: str) -> dict:
    """Global packing over a finite stream (energon's val pipeline reads the train split
    once): every rank plans every sample and keeps the bins dealt to it."""
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset, reraise_exception

    from omni_train.data.loader import task_encoder

    cfg = compose_job(
        [
            *BASE,
            f"data.path={data}",
            "data.blend=null",
            "trainer.seq_length=512",
            "trainer.micro_batch_size=1",
            "data.packing.enabled=true",
            "data.packing.buffer_size=5",  # several refills within the pass
            f"checkpoint.output_dir={out}",
        ]
    )
    r, w = dist.get_rank(), dist.get_world_size()
    loader = get_loader(
        get_val_dataset(
            data,
            split_part="train",
            worker_config=WorkerConfig(
                rank=0, world_size=1, num_workers=0, global_error_handler=reraise_exception
            ),
            batch_size=1,
            task_encoder=task_encoder(cfg, training=True, dp_size=w, dp_rank=r),
        )
    )
    bins, skipped, num_read, fills = [], {}, 0, []
    for batch in loader:
        assert batch.cu_seqlens is not None and batch.tokens.shape[0] == 1
        assert batch.tokens.shape[1] <= 512
        bins.append(batch.keys)
        fills.append(batch.num_real_tokens)
        num_read += batch.num_read
        for reason, n in batch.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {"bins": bins, "skipped": skipped, "num_read": num_read, "fills": fills}


def encoders_mode(root: str, out: str) -> dict:
    from omni_train.data.loader import task_encoder
    from omni_train.data.task_encoder import cook_raw
    from omni_train.datatools.prepare import read_raw
    from omni_train.datatools.synth_media import CATEGORIES
    from omni_train.model.assembly import build_model
    from omni_train.parallel.state import init_parallel
    from omni_train.platform import setup

    cfg = compose_job([*BASE, f"checkpoint.output_dir={out}"])
    platform = setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    model = build_model(cfg, ps, platform).module.eval()
    te = task_encoder(cfg, training=True)
    ids = cfg.model.media_tokens
    checked = {}
    with torch.no_grad():
        for category in CATEGORIES:
            n = 0
            for split in ("train", "val"):
                for key, members in read_raw(Path(root) / category, split):
                    s = te.encode(cook_raw(key, members))
                    imgs, vids = model.vision_encoder.encode(s.images, s.videos)
                    auds = model.audio_encoder(s.audio) if s.audio else []
                    for modality, feats in ((ids.image, imgs + vids), (ids.audio, auds)):
                        got = sum(f.shape[0] for f in feats)
                        want = int((s.tokens == modality).sum())
                        assert got == want, (key, modality, got, want)
                    n += 1
            checked[category] = n
    return checked


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode != "encoders":  # encoders builds the model: init_parallel makes the group
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    modes = {
        "blends": blends_mode,
        "restore": restore_mode,
        "epoch": epoch_mode,
        "packed": packed_mode,
    }
    result = {**modes, "encoders": encoders_mode}[mode](*args)
    out = Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{mode}_rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
