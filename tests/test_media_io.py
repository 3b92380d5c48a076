"""Media codec layer (omni_train.data.media_io) and the synthetic sample generator
(omni_train.datatools.synth_media): round trips, error kinds, exact probes, determinism."""

from __future__ import annotations

import io
import json
import pickle
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image, ImageFile

from omni_train.data.media_io import (
    CLIP_MEAN,
    CLIP_STD,
    MediaError,
    VideoInfo,
    decode_audio,
    decode_image,
    decode_video_audio,
    decode_video_frames,
    probe_image,
    probe_video,
    sample_video_timestamps,
)
from omni_train.datatools.encode import (
    encode_flac,
    encode_jpeg,
    encode_mp3,
    encode_mp4,
    encode_png,
    encode_wav,
)
from omni_train.datatools.synth_media import CATEGORIES, synth_samples

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _normalised(rgb: np.ndarray) -> torch.Tensor:
    """What decode_image should return for ``[H, W, 3]`` uint8 pixels at their own size."""
    return (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - _MEAN) / _STD


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised ``[..., 3, H, W]`` back to 0..255."""
    return (x * _STD + _MEAN) * 255


def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


def _sine(hz: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _moving_square_frames(num_frames: int, height: int = 48, width: int = 64) -> np.ndarray:
    frames = np.full((num_frames, height, width, 3), 30, dtype=np.uint8)
    for f in range(num_frames):
        frames[f, 12:28, 6 * f : 6 * f + 16] = (230, 60, 40)
    return frames


def _expect_media_error(kind: str, fn, *args):
    with pytest.raises(MediaError) as info:
        fn(*args)
    assert info.value.kind == kind, str(info.value)
    return info.value


# ----------------------------------------------------------------------------------- images


def test_png_round_trip_is_exact():
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    data = encode_png(rgb)
    assert probe_image(data) == (30, 20)
    x = decode_image(data, 30, 20)
    assert x.dtype == torch.float32 and x.shape == (3, 20, 30)
    torch.testing.assert_close(x, _normalised(rgb), atol=1e-5, rtol=0)
    assert encode_png(rgb) == data


def test_jpeg_round_trip_within_tolerance():
    yy, xx = np.mgrid[0:40, 0:56]
    rgb = np.stack([xx * 4, yy * 6, (xx + yy) * 2], axis=-1).astype(np.uint8)  # smooth ramps
    data = encode_jpeg(rgb, quality=90)
    assert probe_image(data) == (56, 40)
    err = (_pixels(decode_image(data, 56, 40)) - torch.from_numpy(rgb).permute(2, 0, 1)).abs()
    assert err.mean() < 2.0 and err.max() < 20.0


def test_resize_to_target_and_extreme_aspect():
    rgb = np.zeros((24, 320, 3), dtype=np.uint8)
    rgb[:] = (200, 100, 50)
    data = encode_png(rgb)
    assert probe_image(data) == (320, 24)
    x = decode_image(data, 64, 96)
    assert x.shape == (3, 96, 64)
    # a flat colour survives bicubic resampling exactly (up to float rounding)
    torch.testing.assert_close(
        _pixels(x)[:, 0, 0], torch.tensor([200.0, 100.0, 50.0]), atol=1e-3, rtol=0
    )
    assert torch.allclose(x, x[:, :1, :1].expand_as(x), atol=1e-5)


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_colour_modes_become_rgb():
    white = torch.tensor([255.0, 255.0, 255.0])
    # RGBA: fully transparent is paper (white); opaque keeps its colour
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (10, 200, 30, 255)
    x = _pixels(decode_image(_save(Image.fromarray(rgba)), 8, 8))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([10.0, 200.0, 30.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(x[:, 0, 7], white, atol=1e-3, rtol=0)
    # L
    x = _pixels(decode_image(_save(Image.new("L", (5, 6), 128)), 5, 6))
    torch.testing.assert_close(x, torch.full((3, 6, 5), 128.0), atol=1e-3, rtol=0)
    # palette, with and without a transparent index
    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 40, 50, 60] + [0] * 762)
    x = _pixels(decode_image(_save(pal), 6, 4))
    torch.testing.assert_close(x[:, 2, 3], torch.tensor([40.0, 50.0, 60.0]), atol=1e-3, rtol=0)
    x = _pixels(decode_image(_save(pal, transparency=1), 6, 4))
    torch.testing.assert_close(x[:, 2, 3], white, atol=1e-3, rtol=0)
    # CMYK (JPEG): all-zero ink is white
    x = _pixels(decode_image(_save(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG"), 16, 16))
    assert (x - 255).abs().max() < 3
    # 16-bit greyscale maps its full range onto 0..255 instead of clipping
    grey16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    x = _pixels(decode_image(_save(grey16), 3, 1))
    torch.testing.assert_close(x[0, 0], torch.tensor([0.0, 128.0, 255.0]), atol=1e-3, rtol=0)


def test_bad_images_raise_media_error():
    rgb = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    png, jpeg = encode_png(rgb), encode_jpeg(rgb)
    for bad in (b"", b"not an image at all" * 8, png[:20]):
        _expect_media_error("image", probe_image, bad)
        _expect_media_error("image", decode_image, bad, 8, 8)
    for truncated in (png[: len(png) // 2], jpeg[: len(jpeg) // 2]):
        assert probe_image(truncated) == (64, 64)  # the header alone is intact
        _expect_media_error("image", decode_image, truncated, 8, 8)
    # someone else switching PIL to tolerate truncation must not let a half image through
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        _expect_media_error("image", decode_image, jpeg[: len(jpeg) // 2], 8, 8)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_media_error_is_a_picklable_value_error():
    err = MediaError("audio", "broken")
    assert isinstance(err, ValueError) and str(err) == "audio: broken"
    back = pickle.loads(pickle.dumps(err))
    assert (back.kind, back.message) == ("audio", "broken")
    with pytest.raises(ValueError):
        MediaError("text", "no such kind")


def test_target_size_is_validated():
    with pytest.raises(ValueError) as info:
        decode_image(encode_png(np.zeros((4, 4, 3), np.uint8)), 0, 4)
    assert not isinstance(info.value, MediaError)


# ------------------------------------------------------------------------------------ video


@pytest.fixture(scope="module")
def clip() -> tuple[np.ndarray, bytes]:
    frames = _moving_square_frames(7)
    return frames, encode_mp4(frames, fps=3)


def test_mp4_probe_is_exact(clip):
    _, data = clip
    info = probe_video(data)
    assert info == VideoInfo(7, 3.0, pytest.approx(7 / 3), 64, 48, False)
    sound = _sine(440, 5 / 4, 22050)
    with_audio = probe_video(encode_mp4(_moving_square_frames(5, 32, 32), 4, sound, 22050))
    assert (with_audio.num_frames, with_audio.fps, with_audio.width, with_audio.height) == (
        5,
        4.0,
        32,
        32,
    )
    assert with_audio.has_audio and with_audio.duration_s == pytest.approx(1.25)
    assert encode_mp4(clip[0], fps=3) == data  # byte-stable


def test_mp4_needs_even_sizes():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 33, 32, 3), np.uint8), 2)


def test_video_frames_are_the_nearest_ones(clip):
    frames, data = clip
    fps = 3
    x = decode_video_frames(data, [k / fps for k in range(7)], 64, 48)
    assert x.dtype == torch.float32 and x.shape == (7, 3, 48, 64)
    originals = torch.stack([_normalised(f) for f in frames])
    for k in range(7):
        errors = (originals - x[k]).abs().mean(dim=(1, 2, 3))
        assert int(errors.argmin()) == k and errors[k] < 0.05, errors
    # nearest frame: 0.4 of a period early still rounds up, 0.6 early rounds down
    y = decode_video_frames(data, [(2 - 0.4) / fps, (4 - 0.6) / fps], 64, 48)
    torch.testing.assert_close(y, x[[2, 3]])


def test_video_timestamps_past_the_end_repeat_the_last_frame(clip):
    _, data = clip
    x = decode_video_frames(data, [0.0, 2.0, 2.5, 10.0, 100.0], 32, 40)
    assert x.shape == (5, 3, 40, 32)
    for k in (2, 3, 4):
        assert torch.equal(x[k], x[1])
    assert not torch.equal(x[0], x[1])
    last = decode_video_frames(data, [50.0], 32, 40)  # nothing picked before the end
    assert torch.equal(last[0], x[1])


def test_video_timestamps_are_validated(clip):
    for bad in ([], [1.0, 0.5], [float("nan")]):
        with pytest.raises(ValueError) as info:
            decode_video_frames(clip[1], bad, 8, 8)
        assert not isinstance(info.value, MediaError)


def test_bad_videos_raise_media_error(clip):
    _, data = clip
    wav = encode_wav(_sine(440, 0.2, 16000), 16000)
    for bad in (b"", b"\x00\x01garbage" * 50, data[: len(data) // 2], data[:-200], wav):
        _expect_media_error("video", probe_video, bad)
        _expect_media_error("video", decode_video_frames, bad, [0.0], 8, 8)
    assert "no video stream" in str(_expect_media_error("video", probe_video, wav))
    assert "no audio stream" in str(_expect_media_error("video", decode_video_audio, data))


def test_sample_video_timestamps():
    short = VideoInfo(7, 3.0, 7 / 3, 64, 48, False)
    assert sample_video_timestamps(short, 2.0, 8) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert sample_video_timestamps(short, 3.0, 8) == [k / 3 for k in range(7)]  # not 8
    assert sample_video_timestamps(short, 2.0, 5) == [0.0, 0.5, 1.0, 1.5, 2.0]  # exactly max
    assert sample_video_timestamps(short, 2.0, 4) == pytest.approx(
        [7 / 3 * (k + 0.5) / 4 for k in range(4)]
    )
    long = VideoInfo(3000, 30.0, 100.0, 64, 48, False)
    assert sample_video_timestamps(long, 2.0, 4) == [12.5, 37.5, 62.5, 87.5]
    assert sample_video_timestamps(long, 0.25, 64) == [4.0 * k for k in range(25)]
    empty = VideoInfo(1, 25.0, 0.0, 64, 48, False)
    assert sample_video_timestamps(empty, 2.0, 8) == [0.0]  # one frame, unknown duration
    assert sample_video_timestamps(VideoInfo(1, 0.0, 0.0, 8, 8, False), 2.0, 8) == [0.0]
    with pytest.raises(ValueError):
        sample_video_timestamps(short, 0.0, 8)


# ------------------------------------------------------------------------------------ audio


def test_stereo_wav_becomes_mono_16k_with_pitch_kept():
    left = _sine(1000, 1.5, 44100, 0.6)
    stereo = np.stack([left, 0.5 * left], axis=1)
    data = encode_wav(stereo, 44100)
    assert sf.info(io.BytesIO(data)).channels == 2
    x = decode_audio(data)
    assert x.dtype == torch.float32 and x.ndim == 1
    assert abs(len(x) - 66150 * 16000 / 44100) <= 1
    assert _peak_hz(x, 16000) == pytest.approx(1000, abs=2)
    mid = x[2000:-2000]
    assert float(mid.abs().max()) == pytest.approx(0.45, abs=0.02)  # the channel average
    # already at the target rate: the samples come back as written (16-bit PCM)
    same = decode_audio(data, sample_rate=44100)
    assert len(same) == 66150
    assert np.abs(same.numpy() - stereo.mean(axis=1)).max() < 1e-4


def test_flac_and_mp3_decode():
    wave = _sine(440, 0.75, 22050)
    flac = decode_audio(encode_flac(wave, 22050), 22050)
    assert len(flac) == len(wave) and np.abs(flac.numpy() - wave).max() < 1e-4
    mp3_bytes = encode_mp3(wave, 22050)
    assert mp3_bytes[:3] == b"ID3" or mp3_bytes[0] == 0xFF
    mp3 = decode_audio(mp3_bytes, 22050)
    assert abs(len(mp3) - len(wave)) <= 1152  # gapless header: exact with libsndfile >= 1.1
    assert _peak_hz(mp3, 22050) == pytest.approx(440, abs=3)
    assert _peak_hz(decode_audio(mp3_bytes), 16000) == pytest.approx(440, abs=3)


def test_mp4_audio_track_decodes():
    rate = 22050
    sound = _sine(660, 7 / 3, rate)
    data = encode_mp4(_moving_square_frames(7), 3, sound, rate)
    native = decode_video_audio(data, rate)
    assert len(native) == len(sound)  # AAC priming and end padding trimmed
    # priming dropped: the decoded track is aligned with the input, not shifted by 1024 samples
    assert np.corrcoef(native.numpy()[1000:20000], sound[1000:20000])[0, 1] > 0.99
    resampled = decode_video_audio(data)
    assert abs(len(resampled) - len(sound) * 16000 / rate) <= 1
    assert _peak_hz(resampled, 16000) == pytest.approx(660, abs=3)
    via_fallback = decode_audio(data)  # libsndfile cannot read mp4: FFmpeg takes over
    torch.testing.assert_close(via_fallback, resampled)


def test_bad_audio_raises_media_error():
    header_only = encode_wav(_sine(440, 0.1, 16000), 16000)[:44]
    for bad in (b"", b"RIFF garbage" * 20, header_only):
        _expect_media_error("audio", decode_audio, bad)
    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    _expect_media_error("audio", decode_audio, png)


# ------------------------------------------------------------------------------- synthetic

_FORBIDDEN = (
    "<image>",
    "<video>",
    "<audio>",
    "<img>",
    "</img>",
    "<vid>",
    "</vid>",
    "<sound>",
    "</sound>",
    "<|im_start|>",
    "<|im_end|>",
)
_MEMBER = re.compile(r"[a-z0-9_]+\.(png|jpg|mp4|wav|flac|mp3)")
_KEY = re.compile(r"[a-z0-9_]+")
_NUM = 16  # two of every 8-sample cycle (long audio clip, frame counts 2..9)


@pytest.fixture(scope="module")
def synth():
    return {category: synth_samples(category, _NUM, seed=11) for category in CATEGORIES}


def _fingerprint(sample) -> tuple:
    return (
        sample.key,
        json.dumps(sample.conversation, sort_keys=True),
        json.dumps(sample.truth, sort_keys=True),
        sorted(sample.members.items()),
    )


def test_synth_is_deterministic(synth):
    for category in CATEGORIES:
        again = synth_samples(category, 8, seed=11)  # a prefix of the fixture's samples
        for a, b in zip(again, synth[category][:8], strict=True):
            fa, fb = _fingerprint(a), _fingerprint(b)
            assert fa[:3] == fb[:3], a.key
            # one member at a time, so a failure names the member (once seen in CI, not
            # reproduced since: an mp4 whose bytes differed; see docs/data_format.md)
            assert a.members.keys() == b.members.keys(), a.key
            for name in a.members:
                assert a.members[name] == b.members[name], (
                    f"{a.key}/{name}: {len(a.members[name])} vs {len(b.members[name])} bytes"
                )
        other = synth_samples(category, 2, seed=12)
        assert _fingerprint(other[0])[1:] != _fingerprint(synth[category][0])[1:]


def _media_parts(sample) -> list[dict]:
    parts = []
    for turn in sample.conversation["conversation"]:
        if isinstance(turn["content"], list):
            parts += [p for p in turn["content"] if p["type"] != "text"]
    return parts


def test_synth_samples_follow_the_schema(synth):
    seen = {"system": 0, "think": 0, "multi_turn": 0}
    for category, samples in synth.items():
        assert len({s.key for s in samples}) == len(samples)
        for s in samples:
            assert _KEY.fullmatch(s.key) and s.key.startswith(category)
            turns = s.conversation["conversation"]
            assert list(s.conversation) == ["conversation"]
            roles = [t["role"] for t in turns]
            body = roles[1:] if roles[0] == "system" else roles
            assert body == ["user", "assistant"] * (len(body) // 2) and body
            seen["system"] += roles[0] == "system"
            seen["multi_turn"] += len(body) > 2
            text = json.dumps(s.conversation)
            assert text.isascii()
            for bad in _FORBIDDEN:
                assert bad not in text, (s.key, bad)
            for t in turns:
                if isinstance(t["content"], str):
                    seen["think"] += t["content"].startswith("<think>")
                    continue
                assert t["role"] == "user"
                for p in t["content"]:
                    assert p["type"] in ("text", "image", "video", "audio")
                    keys = {"type", "text"} if p["type"] == "text" else {"type", "member"}
                    if p["type"] == "video" and "audio" in p:
                        assert p["audio"] is True
                        keys.add("audio")
                    assert set(p) == keys
            members = [p["member"] for p in _media_parts(s)]
            assert sorted(members) == sorted(s.members)  # each member referenced exactly once
            assert all(_MEMBER.fullmatch(m) for m in members)
            kinds = {p["type"] for p in _media_parts(s)}
            expected = {
                "text": set(),
                "image": {"image"},
                "multi_image": {"image"},
                "document": {"image"},
                "video": {"video"},
                "audio": {"audio"},
                "audio_video": {"video"},
            }[category]
            assert kinds == expected
            if category == "audio_video":
                assert _media_parts(s)[0].get("audio") is True
    assert all(n > 0 for n in seen.values()), seen


def test_synth_truth_matches_the_media(synth):
    for samples in synth.values():
        for s in samples:
            parts = _media_parts(s)
            images = [p["member"] for p in parts if p["type"] == "image"]
            videos = [p["member"] for p in parts if p["type"] == "video"]
            audio = [p["member"] for p in parts if p["type"] == "audio"]
            assert [list(probe_image(s.members[m])) for m in images] == s.truth["images"]
            assert len(videos) == len(s.truth["videos"]) and len(audio) == len(s.truth["audio"])
            for m, v in zip(videos, s.truth["videos"], strict=True):
                info = probe_video(s.members[m])
                got = (info.num_frames, info.fps, info.width, info.height, info.has_audio)
                assert got == (v["num_frames"], v["fps"], v["width"], v["height"], v["has_audio"])
                if v["has_audio"]:
                    track = decode_video_audio(s.members[m], v["audio_rate"])
                    assert len(track) == v["audio_samples"]
                    assert v["audio_samples"] == round(v["num_frames"] * v["audio_rate"] / v["fps"])
            for m, a in zip(audio, s.truth["audio"], strict=True):
                native = decode_audio(s.members[m], a["sample_rate"])
                assert abs(len(native) - a["num_samples"]) <= (1152 if m.endswith(".mp3") else 0)
                assert sf.info(io.BytesIO(s.members[m])).channels == a["channels"]
                at_16k = decode_audio(s.members[m])
                assert abs(len(at_16k) - a["num_samples"] * 16000 / a["sample_rate"]) <= 1152


def test_synth_category_ranges(synth):
    sizes = [wh for s in synth["image"] for wh in s.truth["images"]]
    assert all(24 <= w <= 320 and 24 <= h <= 320 for w, h in sizes)
    assert any(max(w, h) >= 8 * min(w, h) for w, h in sizes)  # extreme aspect ratios
    assert {m.rsplit(".")[1] for s in synth["image"] for m in s.members} == {"png", "jpg"}
    assert all(2 <= len(s.truth["images"]) <= 3 for s in synth["multi_image"])
    pages = [s.truth["images"] for s in synth["document"]]
    assert all(3 <= len(p) <= 5 and all(wh == [96, 128] for wh in p) for p in pages)
    for category in ("video", "audio_video"):
        videos = [v for s in synth[category] for v in s.truth["videos"]]
        assert {v["num_frames"] for v in videos} == set(range(2, 10))
        assert all(v["has_audio"] == (category == "audio_video") for v in videos)
        for v in videos:
            assert 2 <= v["fps"] <= 4
            assert all(w % 2 == 0 and 32 <= w <= 160 for w in (v["width"], v["height"]))
    clips = [(i, s.truth["audio"][0], s) for i, s in enumerate(synth["audio"])]
    for i, a, s in clips:
        seconds = a["num_samples"] / a["sample_rate"]
        assert 31 <= seconds <= 35 if i % 8 == 7 else 0.5 <= seconds <= 3
        assert a["sample_rate"] in (16000, 22050, 44100)
        assert next(iter(s.members)).endswith(("wav", "flac", "mp3")[i % 3])
    assert {a["channels"] for _, a, _ in clips} == {1, 2}


def test_synth_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="tiny"):
        synth_samples("image", 1, 0, scale="full")
    with pytest.raises(ValueError, match="audio_video"):
        synth_samples("sketch", 1, 0)
    assert synth_samples("text", 0, 0) == []
