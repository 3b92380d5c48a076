"""Learnability tasks: short questions whose answer can only be read from the media.

Each task asks one question about one media item and answers with one short word; the answer
is the only thing that varies with the media. A model that answers above chance on held-out
samples has read the media through encoder, projector and splice; the same samples with the
media replaced by noise (``media="noise"``, same sizes and lengths, so the same token counts)
or removed (``media="none"``) are the controls: they leave only the answers' prior, and the
classes are balanced (sample ``i`` answers ``classes[i % K]``), so the prior is worth exactly
``1 / K`` on a held-out set whose size is a multiple of ``K``.

=================  ===========  =================================================  ========
task               category     the media and the answer                           classes
=================  ===========  =================================================  ========
image_colour       image        a shape on a neutral background: its colour        6
image_shape        image        a blue shape on white: square, circle or triangle  3
document_bars      document     a page with 2-5 text bars: how many                4
video_direction    video        a square moving over 4 frames: right/left/down/up  4
audio_pitch        audio        a sine tone amid silence: E4, G5, B6 or C8         4
audio_video_order  audio_video  a clip whose track plays a low and a high tone,    2
                                in either order: which comes first
=================  ===========  =================================================  ========

Categories are those of :mod:`omni_train.datatools.synth_media`, so a folder of task samples
stands wherever a synthetic category does (``data.synthetic_root``); the conversation JSON
also records ``task`` and ``answer`` (the task encoder reads only ``conversation``), which the
answer probe (:mod:`omni_train.stage.probe`) reads back. Media are drawn with the same helpers
as ``synth_media`` and sample ``i`` of a task draws from
``np.random.default_rng((seed, task_index, i))``: identical arguments, identical bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from omni_train.datatools.encode import encode_mp4, encode_png, encode_wav
from omni_train.datatools.synth_media import (
    _COLOURS,
    _DIRECTIONS,
    SynthSample,
    _draw_shape,
    _sine,
)

__all__ = ["MEDIA_MODES", "TASKS", "Task", "task_samples"]

MEDIA_MODES = ("real", "noise", "none")
_HUES = ("red", "green", "blue", "yellow", "purple", "orange")
_NEUTRAL = ("black", "white", "grey")
_RATE = 16000
# Peak bins 14, 32, 70 and 101 of the front end's 128 mels, >= 2 cells apart after the
# encoder's 8x subsampling, which also strides over frequency; named by letter. The first set
# had C3 (bin 4) for C, next to E4 at the bottom of the axis: runs plateaued at 75 %,
# answering every C3 with E. With C8 the CI pair (image_colour + audio_pitch, 200 steps)
# reached 100 % where C3 reached 77 %; notes evenly spread over bins 22-82 (C5 B5 G6 E7)
# reached 52 %: the spacing alone does not decide it
# (benchmarks/results/learning_explore/pitch_notes_200).
_PITCHES = {"C": 4186.01, "E": 329.63, "G": 783.99, "B": 1975.53}
_LOW_HIGH = {"low": 220.0, "high": 1760.0}
_MOVES = {"right": "left to right", "left": "right to left", "down": "top to bottom",
          "up": "bottom to top"}  # fmt: skip

Built = tuple[list[dict], dict[str, bytes]]  # media parts, members


@dataclass(frozen=True)
class Task:
    name: str
    category: str  # the synth_media category whose folder holds its samples
    question: str
    classes: tuple[str, ...]  # every answer; sample i answers classes[i % len(classes)]
    draw: Callable[[np.random.Generator, str, str], Built]  # (rng, answer, media) -> parts

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classes)


def _noise_pixels(rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    """Uniform noise of ``like``'s shape (an image [h, w, 3] or frames [f, h, w, 3])."""
    return rng.integers(0, 256, size=like.shape, dtype=np.uint8)


def _image(rng, pixels: np.ndarray, media: str) -> Built:
    if media == "noise":
        pixels = _noise_pixels(rng, pixels)
    return [{"type": "image", "member": "img0.png"}], {"img0.png": encode_png(pixels)}


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """64 x 64 (4 x 4 patches of the tiny ViT): one token layout for every sample, so the
    tasks test reading the media, not dynamic resolution (tested elsewhere)."""
    return 64, 64


def _image_colour(rng: np.random.Generator, answer: str, media: str) -> Built:
    width, height = _size(rng)
    shape = ("square", "circle", "triangle")[int(rng.integers(3))]
    background = _NEUTRAL[int(rng.integers(len(_NEUTRAL)))]
    return _image(rng, _draw_shape(rng, width, height, shape, answer, background), media)


def _image_shape(rng: np.random.Generator, answer: str, media: str) -> Built:
    """Blue on white, 70-95 % of the side, anywhere: only the shape and its place vary."""
    width, height = _size(rng)
    pixels = _draw_shape(rng, width, height, answer, "blue", "white", scale=(0.7, 0.95))
    return _image(rng, pixels, media)


_PAGE_W, _PAGE_H = 64, 96


def _document_bars(rng: np.random.Generator, answer: str, media: str) -> Built:
    """A white page with ``answer`` dark bars, one per 16-pixel row from the top."""
    page = np.full((_PAGE_H, _PAGE_W, 3), 250, dtype=np.uint8)
    ink = int(rng.integers(0, 60))
    for n in range(int(answer)):
        top = 5 + 16 * n + int(rng.integers(0, 5))
        left = int(rng.integers(4, 12))
        page[top : top + 6, left : left + int(rng.integers(28, _PAGE_W - left - 2))] = ink
    return _image(rng, page, media)


def _frames(rng, answer: str, num_frames: int, width: int, height: int) -> np.ndarray:
    """A red square on white, its side and its offset across the path drawn at random."""
    (sx, sy), (ex, ey) = _DIRECTIONS[_MOVES[answer]]
    side = int(rng.integers(min(width, height) // 4, min(width, height) // 2 + 1))
    across = rng.uniform(0.2, 0.8)  # where on the perpendicular axis the path runs
    sx, ex = (across, across) if sx == ex else (sx, ex)
    sy, ey = (across, across) if sy == ey else (sy, ey)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = _COLOURS["white"]
    for f in range(num_frames):
        u = f / (num_frames - 1)
        x = round(((1 - u) * sx + u * ex) * (width - side))
        y = round(((1 - u) * sy + u * ey) * (height - side))
        frames[f, y : y + side, x : x + side] = _COLOURS["red"]
    return frames


def _video_direction(rng: np.random.Generator, answer: str, media: str) -> Built:
    num_frames, (width, height) = 4, _size(rng)
    frames = _frames(rng, answer, num_frames, width, height)
    if media == "noise":
        frames = _noise_pixels(rng, frames)
    return [{"type": "video", "member": "clip.mp4"}], {"clip.mp4": encode_mp4(frames, 2)}


def _noise_like(rng: np.random.Generator, wave: np.ndarray) -> np.ndarray:
    scale = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
    return rng.normal(0.0, scale, size=wave.shape).clip(-1, 1).astype(np.float32)


def _audio_pitch(rng: np.random.Generator, answer: str, media: str) -> Built:
    """A 0.5-1 s tone between 0.25-0.5 s pauses, over a faint noise floor: the encoder
    normalises every mel bin over time (Parakeet's per-feature normalisation), so a tone
    filling the whole clip would leave its bin as flat as the others, and without the floor
    its leakage would make every bin step up and down with it."""
    tone = _sine([_PITCHES[answer]], int(rng.uniform(0.5, 1.0) * _RATE), _RATE,
                 float(rng.uniform(0.3, 0.6)))  # fmt: skip
    before, after = (np.zeros(int(rng.uniform(0.25, 0.5) * _RATE), np.float32) for _ in "ab")
    wave = np.concatenate([before, tone, after])
    # a steady noise floor ~30 dB under the tone: the bins away from it stay noise, not steps
    wave += rng.normal(0.0, 0.01, size=wave.shape).astype(np.float32)
    if media == "noise":
        wave = _noise_like(rng, wave)
    return [{"type": "audio", "member": "audio0.wav"}], {"audio0.wav": encode_wav(wave, _RATE)}


def _audio_video_order(rng: np.random.Generator, answer: str, media: str) -> Built:
    num_frames, fps = 4, 2
    width, height = _size(rng)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = _COLOURS["grey"]  # says nothing about the sound
    order = ["low", "high"] if answer == "low" else ["high", "low"]
    num_samples = num_frames * _RATE // fps  # the track spans the video exactly
    wave = _sine([_LOW_HIGH[o] for o in order], num_samples, _RATE, float(rng.uniform(0.3, 0.6)))
    if media == "noise":
        frames = _noise_pixels(rng, frames)
        wave = _noise_like(rng, wave)
    member = encode_mp4(frames, fps, audio=wave, sample_rate=_RATE)
    return [{"type": "video", "member": "clip.mp4", "audio": True}], {"clip.mp4": member}


_PITCH_Q = "What note is played?"
_ORDER_Q = "Which tone comes first in the clip, the low one or the high one?"
_SHAPES = ("square", "circle", "triangle")
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("image_colour", "image", "What colour is the shape?", _HUES, _image_colour),
        Task("image_shape", "image", "What shape is drawn?", _SHAPES, _image_shape),
        Task(
            "document_bars",
            "document",
            "How many lines of text are on the page?",
            ("2", "3", "4", "5"),
            _document_bars,
        ),  # fmt: skip
        Task(
            "video_direction",
            "video",
            "Which way does the square move?",
            tuple(_MOVES),
            _video_direction,
        ),  # fmt: skip
        Task("audio_pitch", "audio", _PITCH_Q, tuple(_PITCHES), _audio_pitch),
        Task(
            "audio_video_order",
            "audio_video",
            _ORDER_Q,
            tuple(_LOW_HIGH),
            _audio_video_order,
        ),  # fmt: skip
    )
}


def task_samples(
    name: str, num_samples: int, seed: int, *, media: str = "real", start: int = 0
) -> list[SynthSample]:
    """Samples ``start .. start + num_samples - 1`` of task ``name``: one user turn (the media,
    then the question), one assistant turn (the answer word). ``truth`` holds ``task`` and
    ``answer``; so does the conversation document."""
    if name not in TASKS:
        raise ValueError(f"unknown learnability task {name!r}; valid: {', '.join(TASKS)}")
    if media not in MEDIA_MODES:
        raise ValueError(f"media={media!r}; valid: {', '.join(MEDIA_MODES)}")
    task = TASKS[name]
    index = list(TASKS).index(name)
    out = []
    for i in range(start, start + num_samples):
        rng = np.random.default_rng((seed, index, i))
        answer = task.classes[i % len(task.classes)]
        parts, members = task.draw(rng, answer, media) if media != "none" else ([], {})
        question = {"type": "text", "text": task.question}
        doc = {
            "conversation": [
                {"role": "user", "content": [*parts, question]},
                {"role": "assistant", "content": answer},
            ],
            "task": name,
            "answer": answer,
        }
        key = f"{name}_{media}_{seed}_{i:06d}"
        out.append(SynthSample(key, doc, members, {"task": name, "answer": answer}))
    return out
