"""Decoding and probing of media bytes: the data pipeline's only media codec layer.

Every function takes the raw bytes of one webdataset member. Anything that cannot be read or
decoded raises :class:`MediaError` (a ``ValueError``) carrying the modality in ``kind``, so the
loader can skip or report a bad sample without knowing which library (PIL, PyAV, soundfile)
failed underneath. Arguments that are the caller's bug (a negative size, unsorted timestamps)
raise a plain ``ValueError`` instead.

Pixel tensors are float32 ``[3, H, W]`` (images) or ``[F, 3, H, W]`` (video frames), scaled to
[0, 1] and normalised with the CLIP mean/std. Both paths resize as the released image and video
processors do (transformers 5.23 ``nemotron_h_omni``): the 8-bit RGB pixels as float32, torch's
bicubic interpolation with antialiasing, no clamping of the overshoot, so an image and a video
frame of the same picture give the same tensor, and both equal the reference's pixels (within
float rounding; ``tests/test_processor_parity.py``). Waveforms are float32 ``[n]`` mono.

Decoding is deterministic: no seeking, no threads inside the codecs (the data loader's worker
processes provide the parallelism), and fixed resampling settings.

The encoders (PNG, JPEG, MP4, WAV, FLAC, MP3) are dataset tooling, not runtime:
``omni_train.datatools.encode``.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise

import av
import numpy as np
import soundfile as sf
import soxr
import torch
from PIL import Image, ImageFile

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "MediaError",
    "VideoInfo",
    "decode_audio",
    "decode_image",
    "decode_video_audio",
    "decode_video_frames",
    "frame_label_seconds",
    "probe_image",
    "probe_video",
    "sample_video_timestamps",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_KINDS = ("image", "video", "audio")

# What the decoders raise on malformed input. PIL plugins are known to raise almost anything on
# fuzzed headers (SyntaxError, struct.error, IndexError, KeyError, TypeError), so the list is
# broad; it deliberately leaves out AttributeError/NameError/AssertionError, which would be bugs
# in this module, and MemoryError, which must not be mistaken for one bad sample.
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    RuntimeError,  # soundfile.LibsndfileError
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    av.FFmpegError,
    Image.DecompressionBombError,
)


class MediaError(ValueError):
    """A member's bytes could not be read or decoded. ``kind`` is "image", "video" or "audio"."""

    def __init__(self, kind: str, message: str):
        if kind not in _KINDS:
            raise ValueError(f"MediaError kind must be one of {_KINDS}, got {kind!r}")
        # (kind, message) as args keeps the exception picklable, so it survives the trip from
        # a data-loader worker process
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@contextmanager
def _failures_as(kind: str, what: str) -> Iterator[None]:
    try:
        yield
    except MediaError:
        raise
    except _DECODER_ERRORS as e:
        raise MediaError(kind, f"{what}: {type(e).__name__}: {e}") from e


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")


def _pixels(img: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image -> float32 ``[3, height, width]``, resized and CLIP-normalised.

    Resized in float32 with torch's antialiased bicubic, as the released processors do (PIL's
    bicubic on uint8 differs from it by up to a few grey levels, and clamps the overshoot).
    """
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32)
    if (x.shape[1], x.shape[2]) != (height, width):
        x = torch.nn.functional.interpolate(
            x[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )[0]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return ((x / 255.0 - mean) / std).contiguous()


# ----------------------------------------------------------------------------------- images


def probe_image(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the header only: cheap, but does not prove the pixels decode.

    The size is the stored one: EXIF orientation is not applied, here or in
    :func:`decode_image`, so the two always agree.
    """
    with _failures_as("image", "cannot read image header"), Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    if width <= 0 or height <= 0:
        raise MediaError("image", f"image header says {width}x{height}")
    return width, height


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit (and 32-bit) greyscale: map the 16-bit range onto 8 bits instead of letting
        # convert() clip everything above 255 to white
        arr = np.asarray(img, dtype=np.float32)
        if img.mode != "F":
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # composite onto white: transparent regions are paper, not ink, in scans and diagrams
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    return img


def decode_image(data: bytes, width: int, height: int) -> torch.Tensor:
    """Decode fully, convert to RGB, resize (bicubic) to ``width x height`` and normalise.

    Returns float32 ``[3, height, width]``. Truncated or corrupt files raise MediaError rather
    than coming back partly grey: PIL's tolerance for truncated images is switched off here,
    process-wide, since this module is the pipeline's only image decoder.
    """
    _check_size(width, height)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with _failures_as("image", "cannot decode image"), Image.open(io.BytesIO(data)) as img:
        img.load()
        return _pixels(_to_rgb(img), width, height)


# ------------------------------------------------------------------------------------ video


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    has_audio: bool


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    for stream in container.streams.video:
        # cover art in an audio file shows up as a one-picture video stream
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise MediaError("video", "no video stream")


def _frame_rate(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def probe_video(data: bytes) -> VideoInfo:
    """Frame count, rate, duration, size and audio presence from container metadata.

    The frame count is the container's (exact for mp4); when it is unknown it is derived from
    duration * fps, and failing that counted by demuxing (not decoding) the packets.
    """
    with _failures_as("video", "cannot probe video"), av.open(io.BytesIO(data)) as container:
        stream = _video_stream(container)
        fps = _frame_rate(stream)
        duration: float | None = None
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        num_frames = stream.frames or 0
        if num_frames <= 0 and duration and fps:
            num_frames = round(duration * fps)
        if num_frames <= 0:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        if fps is None and duration and num_frames:
            fps = num_frames / duration
        width, height = stream.codec_context.width, stream.codec_context.height
        has_audio = len(container.streams.audio) > 0
    if num_frames <= 0:
        raise MediaError("video", "video stream has no frames")
    if fps is None:
        raise MediaError("video", "video stream has neither a frame rate nor a duration")
    if width <= 0 or height <= 0:
        raise MediaError("video", f"video stream says {width}x{height}")
    if not duration:
        duration = num_frames / fps
    return VideoInfo(num_frames, fps, duration, width, height, has_audio)


def sample_video_timestamps(info: VideoInfo, fps: float, max_frames: int) -> list[float]:
    """Seconds at which to take frames: every ``1 / fps`` s, or ``max_frames`` spread evenly.

    At ``fps``: ``t_k = k / fps`` for every ``t_k < duration``. If that is more than
    ``max_frames``, instead ``t_k = duration * (k + 0.5) / max_frames``, k < max_frames (frame
    centres of equal slices). Never empty: a zero-length video gives ``[0.0]``. A timestamp
    within 1 us of the end counts as past it, so float error in ``duration`` cannot add one.
    """
    if fps <= 0 or max_frames < 1:
        raise ValueError(f"need fps > 0 and max_frames >= 1, got fps={fps}, {max_frames=}")
    duration = info.duration_s
    if duration <= 0 and info.fps > 0:
        duration = info.num_frames / info.fps
    count = 0
    while count / fps < duration - 1e-6:
        count += 1
        if count > max_frames:
            return [duration * (k + 0.5) / max_frames for k in range(max_frames)]
    return [k / fps for k in range(max(count, 1))]


def frame_label_seconds(info: VideoInfo, timestamps: list[float]) -> list[float]:
    """The released processor's label time of each frame :func:`decode_video_frames` picks for
    ``timestamps``: the frame's index times ``int(1000 / fps)`` ms (its arithmetic, truncation
    included: at 30 fps frame 60 is labelled 1.98 s)."""
    period_ms = int(1000.0 / info.fps)
    return [_frame_index(info, t) * period_ms / 1000.0 for t in timestamps]


def _frame_index(info: VideoInfo, t: float) -> int:
    """Index of the frame :func:`decode_video_frames` takes for time ``t``: the first frame
    presented at or after ``t - period / 2``."""
    index = math.ceil(t * info.fps - 0.5 - 1e-9)
    return min(max(index, 0), info.num_frames - 1)


def decode_video_frames(
    data: bytes, timestamps: list[float], width: int, height: int
) -> torch.Tensor:
    """Frames nearest to ``timestamps`` (seconds, ascending), resized and normalised.

    Returns float32 ``[len(timestamps), 3, height, width]``. Time 0 is the first decoded frame.
    For each timestamp the first frame presented at or after ``timestamp - period / 2`` is
    taken, i.e. the nearest one; timestamps past the end repeat the last frame, so the output
    always has ``len(timestamps)`` frames. Frames are resized like images.

    Decoding is sequential without seeking (exact and deterministic, independent of keyframe
    placement), so a long video costs a decode of every frame up to the last timestamp.
    """
    _check_size(width, height)
    times = [float(t) for t in timestamps]
    if not times:
        raise ValueError("decode_video_frames needs at least one timestamp")
    if any(not math.isfinite(t) for t in times) or any(b < a for a, b in pairwise(times)):
        raise ValueError(f"timestamps must be finite and ascending, got {times}")

    picked: list[torch.Tensor] = []
    with _failures_as("video", "cannot decode video"), av.open(io.BytesIO(data)) as container:
        stream = _video_stream(container)
        stream.codec_context.thread_count = 1
        rate = _frame_rate(stream)
        period = 1.0 / rate if rate else 0.0
        origin: float | None = None
        # the newest decoded frame, kept in case the stream ends before the last timestamp;
        # only frames that are actually used get converted
        tail_frame: av.VideoFrame | None = None
        tail: torch.Tensor | None = None
        tail_time = 0.0
        for frame in container.decode(stream):
            t = frame.time
            if t is None:  # no pts: assume a constant rate after the previous frame
                t = 0.0 if origin is None else tail_time + period
            tail_time = t
            if origin is None:
                origin = t
            converted = None
            while len(picked) < len(times) and t - origin >= times[len(picked)] - period / 2:
                if converted is None:
                    converted = _pixels(frame.to_image(), width, height)
                picked.append(converted)
            if len(picked) == len(times):
                break
            tail_frame, tail = frame, converted
        if tail_frame is None and not picked:
            raise MediaError("video", "no frame decodes")
        if len(picked) < len(times):
            if tail is None:
                tail = _pixels(tail_frame.to_image(), width, height)
            picked.extend([tail] * (len(times) - len(picked)))
    return torch.stack(picked)


# ------------------------------------------------------------------------------------ audio


def _finish_audio(wave: np.ndarray, rate: int, sample_rate: int, kind: str) -> torch.Tensor:
    """``[n, channels]`` at ``rate`` -> float32 ``[m]`` mono at ``sample_rate``."""
    if wave.shape[0] == 0 or wave.shape[1] == 0:
        raise MediaError(kind, "audio has no samples")
    if not np.isfinite(wave).all():
        raise MediaError(kind, "audio contains NaN or infinite samples")
    mono = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != sample_rate:
        with _failures_as(kind, f"cannot resample {rate} Hz -> {sample_rate} Hz"):
            mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    if mono.shape[0] == 0:
        raise MediaError(kind, f"audio is shorter than one sample at {sample_rate} Hz")
    return torch.from_numpy(np.ascontiguousarray(mono))


def _decode_audio_av(data: bytes, kind: str) -> tuple[np.ndarray, int]:
    """The first audio stream of any container FFmpeg reads: ``([n, channels] float32, rate)``."""
    with _failures_as(kind, "cannot decode audio"), av.open(io.BytesIO(data)) as container:
        if not container.streams.audio:
            raise MediaError(kind, "no audio stream")
        stream = container.streams.audio[0]
        stream.codec_context.thread_count = 1
        # planar float, layout and rate kept: the downmix (a plain average) and the resampling
        # (soxr) happen in _finish_audio, identically for every container
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        rate = 0
        longest_frame = 0
        for frame in container.decode(stream):
            rate = rate or frame.sample_rate
            longest_frame = max(longest_frame, frame.samples)
            chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        rate = rate or stream.codec_context.sample_rate
        expected = 0
        if stream.duration and stream.time_base and rate:
            expected = round(stream.duration * stream.time_base * rate)
    if not chunks or not rate:
        raise MediaError(kind, "audio stream decodes to no samples")
    wave = np.concatenate(chunks, axis=1).T  # [n, channels]
    # FFmpeg drops the codec's start padding (AAC priming) but not its end padding, which fills
    # the last frame; the container's duration says where the real signal ends
    if 0 < expected < wave.shape[0] <= expected + 2 * longest_frame:
        wave = wave[:expected]
    return wave, rate


def decode_audio(data: bytes, sample_rate: int = 16000) -> torch.Tensor:
    """Decode an audio file to float32 ``[n]`` mono at ``sample_rate``.

    wav/flac/mp3/ogg go through libsndfile; anything it cannot read (aac/m4a, the audio track of
    an mp4, ...) through FFmpeg. Channels are averaged; the rate is converted with soxr "HQ".
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except _DECODER_ERRORS as sf_error:
        try:
            wave, rate = _decode_audio_av(data, "audio")
        except MediaError as av_error:
            raise MediaError(
                "audio",
                f"neither libsndfile ({sf_error}) nor FFmpeg ({av_error.message}) decode it",
            ) from av_error
    return _finish_audio(wave, int(rate), sample_rate, "audio")


def decode_video_audio(data: bytes, sample_rate: int = 16000) -> torch.Tensor:
    """The audio track of a video container as float32 ``[n]`` mono at ``sample_rate``.

    Errors are MediaError with kind "video", the modality of the member; that includes a
    container without an audio stream.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    wave, rate = _decode_audio_av(data, "video")
    return _finish_audio(wave, rate, sample_rate, "video")
