"""``omni-train checkpoint compare-hf``: the reference model and omni-train's on the same inputs.

Both models get identical inputs: the token ids, normalised pixels and waveforms omni-train's
data pipeline makes of each sample (``data convert`` JSONL + media folder), and for audio the
mel features of omni-train's NeMo preprocessor (both encoders then see the same clips and
valid lengths). So the figures measure the *models*; where the released processor builds other
token sequences (issue #16's ``data.layout``), that is a data question, not this one.

The reference (transformers 5.23 ``NemotronH_Omni_Reasoning_V3``) runs in fp32 on the CPU:

- samples with text and images only go through its ``forward`` (``pixel_values`` +
  ``image_grid_hw``): the whole reference path, placeholder check included;
- samples with video or audio go through its component functions (``get_image_features``,
  ``get_video_features``, ``audio_tower`` + ``embed_audio``, ``language_model``) and the
  placeholders are filled here in token order: its ``forward`` cannot take them (the
  ``pixel_values_videos`` path ``torch.cat``s a tensor, an image and a video in one call collide
  on the image placeholder id, and it sizes each audio clip from ``mask.sum() + 1`` frames,
  one token more than the encoder's valid length for some lengths). The output says which
  path each sample took.

Per sample: max |logit difference| / max |reference logit|, the cosine similarity of the flat
logits, and both losses on the sample's assistant tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from omni_train.checkpoint.io import load_weights
from omni_train.config.model import AudioConfig
from omni_train.data import tokens as token_accounting
from omni_train.data.layouts import layout_for
from omni_train.data.media import Media
from omni_train.data.prompts import encode_prompt
from omni_train.data.task_encoder import OmniTaskEncoder, cook_raw
from omni_train.datatools.convert import sample_from_line
from omni_train.datatools.encode import encode_mp4, encode_png, encode_wav
from omni_train.hf.convert import _job, model_from_section, resolve_checkpoint
from omni_train.model.assembly import build_model
from omni_train.model.audio import build_mel_preprocessor
from omni_train.model.vision import patchify
from omni_train.parallel.state import local_world
from omni_train.platform import setup


@dataclass
class ParitySample:
    """One sample as both models take it: ``tokens``/``labels``/``loss_mask`` ``[L]``, its
    media (owner 0)."""

    name: str
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    media: Media


def samples_from_jsonl(
    jsonl: str | Path, media_root: str | Path, cfg, prompts: bool = False
) -> list[ParitySample]:
    """Every line of a ``data convert`` JSONL through omni-train's task encoder (eval mode).
    ``prompts``: each conversation's prompt instead (up to its last assistant turn, ending with
    the generation prompt: :func:`omni_train.data.prompts.encode_prompt`)."""
    encoder = OmniTaskEncoder(
        tokenizer=cfg.data.tokenizer,
        vision=cfg.model.vision,
        audio=cfg.model.audio,
        context_length=2**31,
        layout=layout_for(cfg.data.layout),
        video_fps=cfg.data.video_fps,
        max_video_frames=cfg.data.max_video_frames,
        training=False,
    )
    out = []
    lines = Path(jsonl).read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        raw = sample_from_line(line, Path(media_root), f"line_{lineno}")
        conversation = cook_raw(raw.key, raw.tar_members())
        s = encode_prompt(encoder, conversation)[0] if prompts else encoder.encode(conversation)
        media = Media(
            images=s.images,
            image_sample=[0] * len(s.images),
            videos=s.videos,
            video_sample=[0] * len(s.videos),
            audio=s.audio,
            audio_sample=[0] * len(s.audio),
            sample_names=[raw.key],
            vision_kinds=s.vision_kinds,
        )
        out.append(ParitySample(raw.key, s.tokens, s.labels, s.loss_mask, media))
    return out


# ---- the two models ---------------------------------------------------------------------------


@torch.no_grad()
def our_logits(model, sample: ParitySample, pad_multiple: int = 1) -> torch.Tensor:
    """omni-train's logits ``[L, V]`` (fp32) for one sample; ``pad_multiple``: the sequence
    is padded at the end to this multiple (TP under sequence parallel), which cannot change
    the logits of earlier (causal) positions."""
    ids = sample.tokens[None]
    pad = -ids.shape[1] % pad_multiple
    if pad:
        ids = F.pad(ids, (0, pad), value=int(sample.tokens[-1]))
    device = next(model.parameters()).device
    logits = model(ids.to(device), media=sample.media.to(device), runtime_gather_output=True)
    return logits[0, : sample.tokens.shape[0]].float().cpu()


def _patches(image: torch.Tensor, patch: int) -> tuple[torch.Tensor, list[int]]:
    flat, rows, cols = patchify(image[None], patch)
    return flat, [rows, cols]


def reference_audio(ref, waveforms: list[torch.Tensor], audio: AudioConfig) -> torch.Tensor:
    """The reference audio path on omni-train's clips (one encoder input each) and mel
    features: ``[tokens, h]``."""
    from torch.nn.utils.rnn import pad_sequence

    mel = build_mel_preprocessor(audio).eval()
    clips = [w.float() for w in waveforms]
    lengths = torch.tensor([c.shape[0] for c in clips])
    feats, feat_lengths = mel(input_signal=pad_sequence(clips, batch_first=True), length=lengths)
    features = feats.transpose(1, 2)  # [clips, frames, mels]
    mask = torch.arange(features.shape[1])[None] < feat_lengths[:, None]
    hidden = ref.audio_tower(input_features=features, attention_mask=mask).last_hidden_state
    kept = [
        hidden[i, : token_accounting.audio_clip_tokens(int(n), audio)]
        for i, n in enumerate(lengths)
    ]
    return ref.embed_audio(torch.cat(kept))


def _reference_images(sample: ParitySample, model_cfg):
    """(pixel_values, image_grid_hw) of the sample's images as the reference takes them, or
    (None, None)."""
    patch = model_cfg.vision.patch_size if model_cfg.vision else 16
    images = [_patches(img, patch) for img in sample.media.images]
    if not images:
        return None, None
    return torch.cat([p for p, _ in images]), torch.tensor([g for _, g in images])


@torch.no_grad()
def reference_embeddings(ref, sample: ParitySample, model_cfg) -> torch.Tensor:
    """The reference's LM input ``[1, L, h]`` for a sample, from its component functions
    (module docstring: the route for video and audio)."""
    ids = sample.tokens[None]
    media = sample.media
    pixel_values, grid = _reference_images(sample, model_cfg)
    emb = ref.get_input_embeddings()(ids)
    placeholders = model_cfg.media_tokens
    spliced = []
    vision = {}
    if pixel_values is not None:
        vision["image"] = list(ref.get_image_features(pixel_values, grid).pooler_output)
    if media.videos:
        feats = [ref.get_video_features(v).pooler_output for v in media.videos]
        vision["video"] = [f.reshape(-1, f.shape[-1]) for f in feats]
    if vision:  # video frames fill image placeholders too, in token order
        ordered = [vision[kind][i] for kind, i, _ in media.vision_items()]
        spliced.append((placeholders.image, torch.cat(ordered)))
    if media.audio:
        spliced.append((placeholders.audio, reference_audio(ref, media.audio, model_cfg.audio)))
    for token, feats in spliced:
        mask = (ids == token).unsqueeze(-1)
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(
                f"{sample.name}: {int(mask.sum())} placeholders (id {token}) but the reference "
                f"made {feats.shape[0]} features"
            )
        emb = emb.masked_scatter(mask, feats.to(emb.dtype))
    return emb


@torch.no_grad()
def reference_logits(ref, sample: ParitySample, model_cfg) -> tuple[torch.Tensor, str]:
    """(the reference's logits ``[L, V]``, which path computed them)."""
    if not sample.media.videos and not sample.media.audio:
        pixel_values, grid = _reference_images(sample, model_cfg)
        out = ref(input_ids=sample.tokens[None], pixel_values=pixel_values, image_grid_hw=grid)
        return out.logits[0].float(), "forward"
    out = ref.language_model(inputs_embeds=reference_embeddings(ref, sample, model_cfg))
    return out.logits[0].float(), "components"


@torch.no_grad()
def reference_generate(
    ref, sample: ParitySample, model_cfg, max_new_tokens: int, stop_id: int, pad_id: int
) -> tuple[list[int], str]:
    """(the reference's greedy continuation of a prompt sample, up to ``stop_id`` (kept) or
    ``max_new_tokens``; which path): transformers' ``generate`` with its own cache, on the
    token ids and pixels (text and images), or on :func:`reference_embeddings` (video, audio)."""
    options = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=[stop_id],
        pad_token_id=pad_id,
    )
    if not sample.media.videos and not sample.media.audio:
        ids = sample.tokens[None]
        pixel_values, grid = _reference_images(sample, model_cfg)
        images = {} if pixel_values is None else dict(pixel_values=pixel_values, image_grid_hw=grid)
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **images, **options)
        return out[0, ids.shape[1] :].tolist(), "forward"
    emb = reference_embeddings(ref, sample, model_cfg)
    mask = torch.ones(emb.shape[:2], dtype=torch.long)
    out = ref.generate(inputs_embeds=emb, attention_mask=mask, **options)
    return out[0].tolist(), "components"  # with inputs_embeds: only the new tokens


def load_reference(hf_dir: str | Path):
    from transformers import AutoModelForImageTextToText

    ref = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32)
    return ref.eval()


def metrics(ours: torch.Tensor, ref: torch.Tensor, sample: ParitySample) -> dict:
    """max |Δlogit| / max |ref logit|, cosine similarity, and both losses (assistant tokens;
    every token when the sample has none)."""
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    mask = sample.loss_mask.bool()
    if not mask.any():
        mask = torch.ones_like(mask)

    def loss(logits: torch.Tensor) -> float:
        return F.cross_entropy(logits[mask], sample.labels[mask]).item()

    return {
        "sample": sample.name,
        "tokens": int(sample.tokens.shape[0]),
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "rel_diff": diff / scale if scale else math.inf,
        "cosine": F.cosine_similarity(ours.flatten(), ref.flatten(), dim=0).item(),
        "loss": loss(ours),
        "loss_reference": loss(ref),
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'sample':24s} {'tokens':>6s} {'path':10s} {'max|d|/max|ref|':>16s} {'cosine':>10s}"
    head += f" {'loss':>9s} {'loss ref':>9s}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['sample'][:24]:24s} {r['tokens']:6d} {r['path']:10s} {r['rel_diff']:16.3e} "
            f"{r['cosine']:10.7f} {r['loss']:9.5f} {r['loss_reference']:9.5f}"
        )
    lines.append(
        "path: forward = the reference's own forward; components = its encoder/projector/LM "
        "functions with the placeholders filled here (its forward cannot take video or "
        "omni-train's audio clips; see omni_train/hf/compare.py)"
    )
    return "\n".join(lines)


def main(hf_dir, checkpoint, data, media_root, *, as_json: bool = False, overrides=()) -> int:
    """Compare on the CPU in one process (fp32, TP=1)."""
    ckpt, section, _ = resolve_checkpoint(checkpoint)
    overrides = list(overrides)
    rest = [o for o in overrides if not o.startswith("model.")]
    cfg = _job(model_from_section(section, overrides), rest, "fp32")
    samples = samples_from_jsonl(data, media_root, cfg)
    platform = setup()
    ref = load_reference(hf_dir)
    rows = []
    with local_world(cfg.parallel, platform, cfg.trainer.seed) as ps:
        model = build_model(cfg, ps, platform).module
        load_weights(ckpt, model)
        model.eval()
        for sample in samples:
            ours = our_logits(model, sample)
            theirs, path = reference_logits(ref, sample, cfg.model)
            rows.append({**metrics(ours, theirs, sample), "path": path})
    print(json.dumps(rows, indent=2) if as_json else format_table(rows))
    return 0


def write_parity_set(out: str | Path, seed: int = 0) -> Path:
    """A small ``data convert`` JSONL + media folder covering every input the model takes:
    text only; one image; three images of different sizes; a video with an odd frame count;
    35 s of audio (two encoder clips); a video with its audio track. Returns the JSONL path."""
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def image(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    def tone(seconds: float) -> np.ndarray:
        t = np.arange(int(seconds * 16000)) / 16000
        return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(
            np.float32
        )

    files = {
        "a.png": encode_png(image(64, 96)),
        "b.png": encode_png(image(128, 32)),
        "c.png": encode_png(image(96, 96)),
        "odd.mp4": encode_mp4(np.stack([image(64, 64) for _ in range(5)]), fps=2),
        "long.wav": encode_wav(tone(35.0), 16000),
        # 2.1 s: 210 mel frames. A clip whose frame count (n // 160) is a multiple of 8 gets
        # one more token from the released processor than its valid frames fill; the released
        # model computes that token from fully masked positions (uniform attention over the
        # batch's padding), omni-train's NeMo encoder from masked ones: the one token where the
        # two differ (docs/data_format.md), so the logit comparison avoids such lengths.
        "av.mp4": encode_mp4(np.stack([image(32, 64) for _ in range(4)]), 2, tone(2.1)),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)

    def turn(role: str, *parts) -> dict:
        return {"role": role, "content": list(parts)}

    def text(t: str) -> dict:
        return {"type": "text", "text": t}

    def conv(key: str, *media: dict) -> dict:
        user = turn("user", text(f"Describe the {key}."), *media)
        return {
            "key": key,
            "conversation": [user, turn("assistant", text(f"It is the {key} sample."))],
        }

    lines = [
        {
            "key": "text",
            "conversation": [
                {"role": "system", "content": "You are a helpful assistant."},
                turn("user", text("Name three colours.")),
                turn("assistant", text("Red, green and blue.")),
            ],
        },
        conv("image", {"type": "image", "member": "a.png"}),
        conv(
            "images",
            {"type": "image", "member": "b.png"},
            {"type": "image", "member": "c.png"},
            {"type": "image", "member": "a.png"},
        ),
        conv("video_odd_frames", {"type": "video", "member": "odd.mp4"}),
        conv("audio_35s", {"type": "audio", "member": "long.wav"}),
        conv("audio_video", {"type": "video", "member": "av.mp4", "audio": True}),
    ]
    jsonl = out / "parity.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return jsonl
