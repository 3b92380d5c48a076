"""Token accounting: how many LM tokens each media item becomes.

One module, used by the data side (task encoder, packer: lengths before any pixel or sample is
decoded) and by the model (the placeholder check before the encoders run), so the two can never
disagree. Defaults are the published model's (``VisionConfig`` / ``AudioConfig``); pass a
config's values for other models.

Vision: an image keeps its aspect ratio and is resized to a grid of ``patch`` px patches with an
even number of rows and columns and ``min_patches <= rows*cols <= max_patches``; the 2x2 pixel
shuffle makes one LM token per 2x2 patches (32x32 px). Video frames use a per-video patch
budget (an upper bound only; small frames are not upscaled); with tubelets every
``tubelet_frames`` consecutive frames share one grid of patches (an odd last frame is
duplicated).

Audio (NeMo's arithmetic, checked against the real encoder in the tests): mel frames
``= samples // hop`` (centred STFT), then each stride-2 convolution of ``dw_striding`` maps
``L -> (L - 1) // 2 + 1``: 30 s -> 3000 frames -> 375 tokens. A stream is cut into clips of
``clip_seconds``; the last clip holds the remainder (a remainder shorter than
``min_seconds``, the shortest stream a sample may carry, joins the previous clip instead of
becoming a clip of a few frames).
"""

from __future__ import annotations

import math

from omni_train.config.schema import AudioConfig, VisionConfig

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
    """(rows, cols) of patches for an image of ``width`` x ``height`` px after resizing."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} px: both sides must be > 0")
    rows0, cols0 = height / patch, width / patch
    n0 = rows0 * cols0
    scale = 1.0
    if n0 > max_patches:
        scale = math.sqrt(max_patches / n0)
    elif n0 < min_patches:
        scale = math.sqrt(min_patches / n0)
    rows = cols = 0
    even = lambda v: max(SHUFFLE, SHUFFLE * round(v / SHUFFLE))  # noqa: E731
    # Rounding both sides to even numbers can leave the budget: nudge the common scale (which
    # keeps the aspect ratio) until the grid fits.
    for _ in range(1000):
        rows, cols = even(rows0 * scale), even(cols0 * scale)
        if rows * cols > max_patches and max(rows, cols) > SHUFFLE:
            scale *= 0.998
        elif rows * cols < min_patches and (rows + SHUFFLE) * (cols + SHUFFLE) <= max_patches:
            scale *= 1.002
        else:
            break
    return rows, cols


def grid_tokens(rows: int, cols: int) -> int:
    """LM tokens of one patch grid after the pixel shuffle."""
    return (rows // SHUFFLE) * (cols // SHUFFLE)


def image_tokens(width: int, height: int, **grid_kwargs: int) -> int:
    """LM tokens of one image (media tokens only, no markers)."""
    return grid_tokens(*image_grid(width, height, **grid_kwargs))


def frame_grid(width: int, height: int, patch_budget: int, *, patch: int = PATCH):
    """(rows, cols) of one video frame under a per-frame patch budget (never upscaled)."""
    return image_grid(width, height, patch=patch, min_patches=SHUFFLE**2, max_patches=patch_budget)


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
    patch_budget: int = 1024,
    patch: int = PATCH,
    tubelet_frames: int = TUBELET_FRAMES,
) -> int:
    """LM tokens of one video's frames (media tokens only: no timestamps, no markers)."""
    rows, cols = frame_grid(width, height, patch_budget, patch=patch)
    return video_groups(num_frames, tubelet, tubelet_frames) * grid_tokens(rows, cols)


def audio_clip_samples(num_samples: int, audio: AudioConfig | None = None) -> list[int]:
    """Sizes (in samples) of the clips one stream is cut into."""
    audio = audio or AudioConfig()
    if num_samples <= 0:
        raise ValueError(f"an audio stream needs at least one sample, got {num_samples}")
    clip = round(audio.clip_seconds * audio.sample_rate)
    sizes = [clip] * (num_samples // clip)
    tail = num_samples - clip * len(sizes)
    if tail and sizes and tail < audio.min_seconds * audio.sample_rate:
        sizes[-1] += tail
    elif tail:
        sizes.append(tail)
    return sizes


def audio_clip_tokens(num_samples: int, audio: AudioConfig | None = None) -> int:
    """Encoder output length of one clip (NeMo: centred mel frames, then dw_striding)."""
    audio = audio or AudioConfig()
    length = num_samples // audio.hop_samples
    for _ in range(int(math.log2(audio.subsampling_factor))):
        length = (length - 1) // 2 + 1
    return length


def audio_tokens_for_samples(num_samples: int, audio: AudioConfig | None = None) -> int:
    return sum(audio_clip_tokens(n, audio) for n in audio_clip_samples(num_samples, audio))


def audio_tokens(seconds: float, audio: AudioConfig | None = None) -> int:
    """LM tokens of one audio stream of ``seconds`` (all its clips)."""
    audio = audio or AudioConfig()
    return audio_tokens_for_samples(round(seconds * audio.sample_rate), audio)


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
