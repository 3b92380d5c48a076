"""Token accounting: how many LM tokens each media item becomes.

One module, used by the data side (task encoder, packer: lengths before any pixel or sample is
decoded) and by the model (the placeholder check before the encoders run), so the two can never
disagree. Defaults are the published model's (``VisionConfig`` / ``AudioConfig``); pass a
config's values for other models.

The rules are the released processor's (transformers 5.23 ``nemotron_h_omni``: its image and
video processors and ``_estimate_audio_num_embeddings``), re-implemented here in plain Python
because the runtime must not import torchvision; ``tests/test_processor_parity.py`` checks them
against the reference on thousands of sizes.

Vision: an image keeps its aspect ratio; its patch grid is ``floor(side / patch) + 1`` per side
(Python's ``round(x + 0.5)``), scaled down into ``max_patches`` and up to ``min_patches``, then
rounded to even sides (up while the budget allows, else down). The 2x2 pixel shuffle makes one
LM token per 2x2 patches (32x32 px). A video frame is resized to an aspect-preserving grid near
a target patch count (small frames are upscaled); with tubelets every ``tubelet_frames``
consecutive frames share one grid of patches (an odd last frame is duplicated).

Audio: the reference counts ``1 + samples // hop`` mel frames (the centred STFT's frames; the
feature extractor masks the last one, the model still emits its token), then each stride-2
convolution of ``dw_striding`` maps ``L -> (L - 1) // 2 + 1``: 30 s -> 3001 frames -> 376
tokens. Which clips a stream becomes is the data layout's choice
(:meth:`omni_train.data.layouts.DataLayout.audio_clip_samples`, over :func:`audio_clip_samples`).
"""

from __future__ import annotations

import math

from omni_train.config.model import AudioConfig, VisionConfig

_PUBLISHED = VisionConfig()  # the defaults below are the published model's, from one place
PATCH = _PUBLISHED.patch_size
MIN_PATCHES = _PUBLISHED.min_patches
MAX_PATCHES = _PUBLISHED.max_patches
TUBELET_FRAMES = _PUBLISHED.tubelet_frames
SHUFFLE = 2  # pixel shuffle factor per side


def image_grid(
    width: int,
    height: int,
    *,
    patch: int = PATCH,
    min_patches: int = MIN_PATCHES,
    max_patches: int = MAX_PATCHES,
) -> tuple[int, int]:
    """(rows, cols) of patches for an image of ``width`` x ``height`` px after resizing: the
    reference image processor's ``get_patch_grid_size`` with a 2x2 merge."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} px: both sides must be > 0")
    # Python's round (half to even) on purpose: the reference's rule, odd integers included
    rows, cols = round(height / patch + 0.5), round(width / patch + 0.5)
    factor = min(math.sqrt(max_patches / (rows * cols)), 1.0)
    rows, cols = math.floor(factor * rows), math.floor(factor * cols)
    if max_patches > min_patches and rows * cols < min_patches:
        factor = math.sqrt(min_patches / (rows * cols))
        rows, cols = math.ceil(factor * rows), math.ceil(factor * cols)
    if rem := rows % SHUFFLE:
        if (rows + SHUFFLE - rem) * cols <= max_patches:
            rows += SHUFFLE - rem
        else:
            rows = max(SHUFFLE, rows - rem)
    if rem := cols % SHUFFLE:
        if rows * (cols + SHUFFLE - rem) <= max_patches:
            cols += SHUFFLE - rem
        else:
            cols = max(SHUFFLE, cols - rem)
    return rows, cols


def grid_tokens(rows: int, cols: int) -> int:
    """LM tokens of one patch grid after the pixel shuffle."""
    return (rows // SHUFFLE) * (cols // SHUFFLE)


def image_tokens(width: int, height: int, **grid_kwargs: int) -> int:
    """LM tokens of one image (media tokens only, no markers)."""
    return grid_tokens(*image_grid(width, height, **grid_kwargs))


def frame_grid(width: int, height: int, target_patches: int, *, patch: int = PATCH):
    """(rows, cols) of one video frame: the reference video processor's aspect-preserving
    tile near ``target_patches`` patches (upscaling small frames), sides even. ``patch`` is
    unused by the rule (it works in patches) and kept for symmetry with :func:`image_grid`."""
    if width <= 0 or height <= 0:
        raise ValueError(f"video frame size {width}x{height} px: both sides must be > 0")
    aspect = width / max(height, 1)
    rows = max(round(math.sqrt(target_patches / aspect)), 1)
    cols = max(round(math.sqrt(target_patches * aspect)), 1)
    up_r, up_c = rows + (-rows % SHUFFLE), cols + (-cols % SHUFFLE)
    if up_r * up_c <= target_patches:
        return up_r, up_c
    return max(SHUFFLE, rows - rows % SHUFFLE), max(SHUFFLE, cols - cols % SHUFFLE)


def video_groups(
    num_frames: int, tubelet: bool = True, tubelet_frames: int = TUBELET_FRAMES
) -> int:
    """Frame groups that go through the ViT: tubelets (odd last frame duplicated) or frames."""
    if num_frames <= 0:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    return math.ceil(num_frames / tubelet_frames) if tubelet else num_frames


def video_tokens(
    num_frames: int,
    width: int,
    height: int,
    tubelet: bool = True,
    *,
    target_patches: int = 1024,
    patch: int = PATCH,
    tubelet_frames: int = TUBELET_FRAMES,
) -> int:
    """LM tokens of one video's frames (media tokens only: no timestamps, no markers)."""
    rows, cols = frame_grid(width, height, target_patches, patch=patch)
    return video_groups(num_frames, tubelet, tubelet_frames) * grid_tokens(rows, cols)


def audio_clip_samples(
    num_samples: int, audio: AudioConfig | None = None, clip_seconds: float | None = None
) -> list[int]:
    """Sizes (in samples) of the clips one stream is cut into: clips of ``clip_seconds``
    (default ``audio.clip_seconds``; 0 keeps the stream whole, as the reference processor
    does), the last one holding the remainder; a remainder shorter than ``audio.min_samples``
    joins the previous clip instead of becoming a clip of a few frames."""
    audio = audio or AudioConfig()
    if num_samples <= 0:
        raise ValueError(f"an audio stream needs at least one sample, got {num_samples}")
    seconds = audio.clip_seconds if clip_seconds is None else clip_seconds
    if seconds <= 0:
        return [num_samples]
    clip = round(seconds * audio.sample_rate)
    sizes = [clip] * (num_samples // clip)
    tail = num_samples - clip * len(sizes)
    if tail and sizes and tail < audio.min_samples:
        sizes[-1] += tail
    elif tail:
        sizes.append(tail)
    return sizes


def audio_clip_tokens(num_samples: int, audio: AudioConfig | None = None) -> int:
    """Encoder output length of one clip (the reference: ``1 + samples // hop`` mel frames,
    then ``dw_striding``); at least 1."""
    audio = audio or AudioConfig()
    length = 1 + num_samples // audio.hop_samples
    for _ in range(int(math.log2(audio.subsampling_factor))):
        length = (length - 1) // 2 + 1
    return max(1, length)


def audio_tokens_for_samples(
    num_samples: int, audio: AudioConfig | None = None, clip_seconds: float | None = None
) -> int:
    return sum(
        audio_clip_tokens(n, audio) for n in audio_clip_samples(num_samples, audio, clip_seconds)
    )


def audio_tokens(
    seconds: float, audio: AudioConfig | None = None, clip_seconds: float | None = None
) -> int:
    """LM tokens of one audio stream of ``seconds`` (all its clips)."""
    audio = audio or AudioConfig()
    return audio_tokens_for_samples(round(seconds * audio.sample_rate), audio, clip_seconds)


MARKERS_PER_RUN = 2  # every placeholder run is wrapped in a start and an end marker


def audio_token_seconds(audio: AudioConfig | None = None) -> float:
    """Seconds of audio one encoder output token covers (80 ms for Parakeet)."""
    audio = audio or AudioConfig()
    return audio.subsampling_factor * audio.hop_samples / audio.sample_rate


def sample_tokens(text_tokens: int, runs: list[int]) -> int:
    """Whole-sample length: template and text tokens (timestamps included) plus every
    non-empty placeholder run (one image, one video frame group, one audio chunk) with its two
    markers. The chat template lays a sample out as exactly these pieces."""
    return text_tokens + sum(n + MARKERS_PER_RUN for n in runs if n)
