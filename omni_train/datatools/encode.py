"""Media encoders for dataset tooling (synthetic data, tests, benchmarks): deterministic, with
byte-identical output for identical input on one installation. The runtime only decodes
(:mod:`omni_train.data.media_io`)."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import av
import numpy as np
import soundfile as sf
from PIL import Image


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    return np.ascontiguousarray(rgb)


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG bytes (no metadata chunks, so byte-stable)."""
    buf = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """uint8 ``[H, W, 3]`` -> baseline JPEG bytes (4:2:0 chroma subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_mp4(
    frames: np.ndarray, fps: int, audio: np.ndarray | None = None, sample_rate: int = 16000
) -> bytes:
    """uint8 ``[F, H, W, 3]`` frames (+ optional float ``[n]`` mono audio) -> mp4 bytes.

    Video is H.264 (libx264, CRF 12, B-frames on, yuv420p). 4:2:0 chroma needs even sizes, so
    odd H or W raise ValueError rather than being silently cropped or padded. Audio, when
    given, becomes an AAC mono track at ``sample_rate``.

    Byte-stable: the muxer runs with ``+bitexact`` (no encoder version tag; mp4 carries no
    creation time unless asked to) and x264 runs single-threaded, because its bitstream depends
    on the thread count, which would otherwise follow the machine's core count.
    The movie timescale is a multiple of both ``fps`` and ``sample_rate``, so the edit lists
    (which tell a decoder to skip the B-frame delay and the AAC priming) state the durations
    exactly: probing gives ``F / fps`` seconds and the audio track decodes to exactly ``n``
    samples.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or not len(frames):
        raise ValueError(f"expected uint8 [F, H, W, 3] with F >= 1, got {list(frames.shape)}")
    num_frames, height, width = frames.shape[:3]
    if height % 2 or width % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {width}x{height}")
    if int(fps) != fps or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps}")
    fps = int(fps)
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or not audio.size:
            raise ValueError(f"audio must be non-empty mono [n], got shape {list(audio.shape)}")

    # a movie timescale that divides both frame and sample periods: edit lists (B-frame delay,
    # AAC priming) are stated in it, and FFmpeg's default of 1000 would round the durations
    # read back from them to the millisecond
    timescale = math.lcm(fps, sample_rate if audio is not None else 1000)
    options = {"fflags": "+bitexact", "movie_timescale": str(timescale)}
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options=options) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.thread_count = 1
        video.options = {"crf": "12", "preset": "medium"}
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
            sound.codec_context.thread_count = 1
        video_base = Fraction(1, fps)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts, frame.time_base = i, video_base
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            # explicit pts from 0 lets the encoder mark its priming samples with negative
            # timestamps, which the muxer turns into an edit list
            step = sound.codec_context.frame_size or 1024
            audio_base = Fraction(1, sample_rate)
            for start in range(0, len(audio), step):
                chunk = np.clip(audio[start : start + step], -1.0, 1.0)[None]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, audio_base
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))
    return buf.getvalue()


def _encode_sound(wave: np.ndarray, sample_rate: int, fmt: str, subtype: str) -> bytes:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim not in (1, 2) or not wave.shape[0]:
        raise ValueError(f"expected float [n] or [n, channels], got {list(wave.shape)}")
    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def encode_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    """float ``[n]`` or ``[n, channels]`` in [-1, 1] -> 16-bit PCM WAV bytes."""
    return _encode_sound(wave, sample_rate, "WAV", "PCM_16")


def encode_flac(wave: np.ndarray, sample_rate: int) -> bytes:
    """float ``[n]`` or ``[n, channels]`` in [-1, 1] -> 16-bit FLAC bytes."""
    return _encode_sound(wave, sample_rate, "FLAC", "PCM_16")


def encode_mp3(wave: np.ndarray, sample_rate: int) -> bytes:
    """float ``[n]`` or ``[n, channels]`` in [-1, 1] -> MP3 bytes (libsndfile's LAME).

    libsndfile writes the LAME gapless header, so decoding through :func:`decode_audio` returns
    exactly ``n`` samples at the original rate.
    """
    return _encode_sound(wave, sample_rate, "MP3", "MPEG_LAYER_III")
