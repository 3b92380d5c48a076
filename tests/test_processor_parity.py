"""``data.layout=processor`` against the released processor (transformers 5.23
``NemotronH_Omni_Reasoning_V3Processor`` with its image and video processors and
``ParakeetFeatureExtractor``), run in a child process (``tests/processor_reference.py`` says
how torchvision is made to import beside the CPU torch).

For the same conversation and media: the token ids are equal, the pixels equal within bf16
rounding, and the mel features (omni-train's, computed in the model by NeMo's preprocessor)
equal the feature extractor's within 1e-4. The grid and audio-token rules are checked on
thousands of sizes.
"""

from __future__ import annotations

import io
import json
import random

import av
import numpy as np
import processor_reference as reference
import pytest
import torch
from PIL import Image

from omni_train.config.data import TokenizerConfig
from omni_train.config.model import AudioConfig, VisionConfig
from omni_train.data import media_io, tokens
from omni_train.data.chat import prompt
from omni_train.data.conversation import parse_conversation
from omni_train.data.layouts import PROCESSOR
from omni_train.data.prompts import encode_prompt
from omni_train.data.task_encoder import OmniTaskEncoder, cook_raw
from omni_train.data.tokenizer import TINY_DIR
from omni_train.datatools import encode
from omni_train.model.vision import patchify

pytestmark = pytest.mark.skipif(
    reference.available() is not None, reason=str(reference.available())
)

VISION, AUDIO = VisionConfig(), AudioConfig()  # the released model's
SR = AUDIO.sample_rate


def test_grid_and_audio_token_rules_equal_the_reference():
    rng = random.Random(0)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(2015)]
    sizes += [(16 * a, 16 * b) for a in (1, 31, 45, 46, 80) for b in (1, 31, 45, 46, 115)]
    small = [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(500)]
    lengths = [rng.randint(1, 40 * SR) for _ in range(1000)] + [1, 159, 160, 161, 1279, 1280]
    req = dict(patch=16, min_patches=VISION.min_patches, max_patches=VISION.max_patches)
    grids, video_grids, video_small, audio = reference.run(
        [
            dict(kind="image_grid", sizes=sizes, **req),
            dict(kind="video_grid", sizes=sizes[:500], target=1024),
            dict(kind="video_grid", sizes=small, target=256),
            dict(kind="audio_tokens", lengths=lengths),
        ]
    )
    assert [tokens.image_grid(w, h) for w, h in sizes] == [tuple(g) for g in grids]
    assert [tokens.frame_grid(w, h, 1024) for w, h in sizes[:500]] == [
        tuple(g) for g in video_grids
    ]
    assert [tokens.frame_grid(w, h, 256) for w, h in small] == [tuple(g) for g in video_small]
    assert [tokens.audio_clip_tokens(n) for n in lengths] == audio


# ---- whole samples ------------------------------------------------------------------------


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (200, 30, 30)  # edges to resample
    return encode.encode_png(rgb)


def _mp4(num_frames: int, fps: int, width: int, height: int, seconds_audio: float = 0.0):
    rng = np.random.default_rng(num_frames * 100 + fps)
    frames = rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    audio = _tone(seconds_audio, 7) if seconds_audio else None
    return encode.encode_mp4(frames, fps, audio)


def _tone(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )


def _frames(data: bytes, info: media_io.VideoInfo, stamps: list[float]):
    """The source frames (uint8) the decoder picks for ``stamps``, and their indices."""
    with av.open(io.BytesIO(data)) as c:
        every = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    indices = [media_io._frame_index(info, t) for t in stamps]
    return np.stack([every[i] for i in indices]), indices


CASES = {
    "images": [
        ((1280, 720), "png"),
        ((37, 2000), "png"),
        ((640, 481), "jpg"),
        ((3000, 500), "png"),
    ],
    "video_odd_2fps": (5, 2, 64, 48, 0.0),
    "video_even_30fps": (60, 30, 96, 64, 0.0),
    "video_odd_5fps": (7, 5, 320, 240, 0.0),
    "audio": [0.5, 3.3, 31.0, 40.0],
    "audio_video": (9, 4, 128, 96, 2.3),
}


def _sample(name: str):
    """(conversation, members, reference request media) for one case."""
    members, user = {}, [{"type": "text", "text": "Look at this:"}]
    ref = {}
    case = CASES[name]
    if name == "images":
        ref["images"] = []
        for i, ((w, h), fmt) in enumerate(case):
            data = _png(w, h, i)
            if fmt == "jpg":
                data = encode.encode_jpeg(np.asarray(Image.open(io.BytesIO(data))))
            members[f"img{i}.{fmt}"] = data
            user.append({"type": "image", "member": f"img{i}.{fmt}"})
            ref["images"].append(data)
    elif name == "audio":
        ref["audio"] = []
        for i, seconds in enumerate(case):
            members[f"a{i}.wav"] = encode.encode_wav(_tone(seconds, i), SR)
            user.append({"type": "audio", "member": f"a{i}.wav"})
    else:
        num_frames, fps, w, h, audio_s = case
        members["v.mp4"] = _mp4(num_frames, fps, w, h, audio_s)
        user.append({"type": "video", "member": "v.mp4", "audio": bool(audio_s)})
    conversation = {
        "conversation": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": "<think>ok</think>It is a test."},
        ]
    }
    return conversation, members, ref


@pytest.fixture(scope="module")
def parity():
    encoder = OmniTaskEncoder(
        tokenizer=TokenizerConfig(),
        vision=VISION,
        audio=AUDIO,
        context_length=1 << 20,
        layout=PROCESSOR,
        training=False,
        video_fps=2.0,
    )
    ours, requests = {}, []
    for name in CASES:
        conversation, members, ref = _sample(name)
        raw = cook_raw(name, {"json": json.dumps(conversation).encode(), **members})
        planned = encoder.plan(raw)
        sample = encoder.decode(planned)
        turns = parse_conversation(raw.conversation, set(raw.members))
        req = dict(
            kind="process",
            text=prompt(turns, planned.plans, encoder.tok, PROCESSOR),
            tokenizer=str(TINY_DIR),
            min_patches=VISION.min_patches,
            max_patches=VISION.max_patches,
            video_target=max(VISION.video_patch_budgets),
            mels=AUDIO.num_mel_bins,
            **ref,
        )
        if "v.mp4" in members:
            info = media_io.probe_video(members["v.mp4"])
            stamps = list(planned.plans[0].timestamps)
            frames, indices = _frames(members["v.mp4"], info, stamps)
            req["video"] = (frames, info.fps, indices)
        if sample.audio:
            req["audio"] = [a.numpy() for a in sample.audio]
        ours[name] = sample
        requests.append(req)
        # the generation prompt (omni-train generate): the conversation before its last
        # assistant turn, ending with the template's opening of a reply
        ours[f"{name}/prompt"] = encode_prompt(encoder, raw)[0]
        cut = [t for t in turns if t.role != "assistant"]
        text = prompt(cut, planned.plans, encoder.tok, PROCESSOR, generation_prompt=True)
        requests.append({**req, "text": text})
    answers = reference.run(requests)
    names = [n for name in CASES for n in (name, f"{name}/prompt")]
    return ours, dict(zip(names, answers, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_token_ids_equal_the_reference(parity, name):
    ours, ref = parity
    assert ours[name].tokens.tolist() == [int(i) for i in ref[name]["input_ids"]]


@pytest.mark.parametrize("name", list(CASES))
def test_generation_prompt_ids_equal_the_reference(parity, name):
    """The prompt ``omni-train generate`` answers: its ids equal the released processor's for
    the same rendered text (conversation before the last assistant turn, generation prompt)."""
    ours, ref = parity
    got = ours[f"{name}/prompt"].tokens.tolist()
    assert got == [int(i) for i in ref[f"{name}/prompt"]["input_ids"]]
    full = ours[name].tokens.tolist()
    assert full[: len(got) - 1] == got[:-1]  # the same conversation up to the reply's opening


def _bf16_close(ours: torch.Tensor, ref: np.ndarray) -> None:
    torch.testing.assert_close(ours, torch.from_numpy(ref).float(), rtol=2**-8, atol=1e-4)


@pytest.mark.parametrize(
    "name", ["images", "video_odd_2fps", "video_even_30fps", "video_odd_5fps", "audio_video"]
)
def test_pixels_equal_the_reference(parity, name):
    ours, ref = parity
    sample, answer = ours[name], ref[name]
    if sample.images:
        flat = torch.cat([patchify(img[None], 16)[0] for img in sample.images])
        _bf16_close(flat, answer["pixel_values"])
        grids = [[img.shape[1] // 16, img.shape[2] // 16] for img in sample.images]
        assert grids == answer["image_grid_hw"].tolist()
    else:
        (video,) = sample.videos
        _bf16_close(video, answer["pixel_values_videos"])


@pytest.mark.parametrize("name", ["audio", "audio_video"])
def test_mel_features_equal_the_feature_extractor(parity, name):
    from omni_train.model.audio import AudioEncoder

    tiny = AudioConfig(num_layers=1, d_model=16, num_heads=2, subsampling_conv_channels=8)
    encoder = AudioEncoder(tiny).eval()
    ours, ref = parity
    clips = ours[name].audio
    feats, lengths = encoder.features(clips)
    want = torch.from_numpy(ref[name]["input_features"])  # [clips, frames, mels], padded
    for k, clip in enumerate(clips):
        frames = 1 + clip.shape[0] // AUDIO.hop_samples
        assert int(lengths[k]) == clip.shape[0] // AUDIO.hop_samples
        torch.testing.assert_close(feats[k, :frames], want[k, :frames], rtol=0, atol=1e-4)
