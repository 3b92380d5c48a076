"""Deterministic synthetic conversation samples, one generator per data category.

:func:`synth_samples` returns, for a category, ``num_samples`` samples in the project's on-disk
format: a conversation JSON document plus encoded media members (PNG/JPEG images, H.264 mp4,
WAV/FLAC/MP3 audio), and a ``truth`` record of what was encoded, so tests can check token
counts exactly. Nothing is written to disk; ``omni-train data synth`` packs the samples into
webdataset shards.

The content is simple but grounded, so a model can in principle learn it: questions ask for the
colour and shape drawn, the direction a square moves, the note a sine tone plays, the number of
pages of a "document" whose text lines are dark bars. Sample ``i`` of a category draws from
``np.random.default_rng((seed, category_index, i))`` and every encoder is deterministic, so the
same arguments give byte-identical samples, on any rank, in any order.

Conversation document::

    {"conversation": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in the picture?"},
            {"type": "image", "member": "img0.png"}]},
        {"role": "assistant", "content": "<think>the square is red</think>A red square."}]}

``content`` is a string or a list of parts: ``text``, ``image``, ``video`` (``"audio": true``
means "use the container's audio track"), ``audio``; each media member is referenced once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from omni_train.datatools.encode import (
    encode_flac,
    encode_jpeg,
    encode_mp3,
    encode_mp4,
    encode_png,
    encode_wav,
)

__all__ = ["CATEGORIES", "SCALES", "SynthSample", "synth_samples"]

CATEGORIES = ("text", "image", "multi_image", "document", "video", "audio", "audio_video")
SCALES = ("tiny",)

_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Answer briefly and precisely.",
    "You answer questions about the attached media.",
)

_COLOURS = {
    "red": (215, 38, 45),
    "green": (40, 160, 70),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 40),
    "purple": (130, 55, 175),
    "orange": (245, 135, 30),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}
_SHAPES = ("square", "circle", "triangle")
_SHAPE_REASON = {
    "square": "four straight sides of equal length",
    "circle": "no corners at all",
    "triangle": "three straight sides",
}

# equal-tempered pitch classes around middle C, named without accidentals so answers stay ASCII
_NOTES = {"C": 261.63, "D": 293.66, "E": 329.63, "F": 349.23, "G": 392.0, "A": 440.0, "B": 493.88}
_AUDIO_RATES = (16000, 22050, 44100)
_AUDIO_FORMATS = ("wav", "flac", "mp3")
_WORDS = ("cat", "river", "planet", "garden", "yellow", "window", "music", "silver", "orbit")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_DIRECTIONS = {  # name -> (start, end) of the square's centre in units of the free travel range
    "left to right": ((0.0, 0.5), (1.0, 0.5)),
    "right to left": ((1.0, 0.5), (0.0, 0.5)),
    "top to bottom": ((0.5, 0.0), (0.5, 1.0)),
    "bottom to top": ((0.5, 1.0), (0.5, 0.0)),
}

_QA = tuple[str, str, str | None]  # question, answer, reasoning for a <think> block (or None)


@dataclass
class SynthSample:
    key: str  # webdataset key: [a-z0-9_]+, no dots, unique per category
    conversation: dict  # {"conversation": [turn, ...]}
    members: dict[str, bytes]  # member name -> encoded bytes, e.g. {"img0.png": b"..."}
    # media in the order their parts appear: {"images": [[w, h]], "videos": [...], "audio": [...]}
    truth: dict = field(default_factory=dict)


def synth_samples(
    category: str, num_samples: int, seed: int, *, scale: str = "tiny"
) -> list[SynthSample]:
    """``num_samples`` samples of ``category``; identical bytes for identical arguments.

    Only ``scale="tiny"`` exists: media small enough for a CPU test to decode hundreds of
    samples in seconds (images <= 320 px, videos <= 9 frames of <= 160 px, audio mostly
    <= 3 s with one 31-35 s clip in every 8 samples).
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    if num_samples < 0 or seed < 0:
        raise ValueError(f"num_samples and seed must be >= 0, got {num_samples}, {seed}")
    build = _BUILDERS[category]
    index = CATEGORIES.index(category)
    samples = []
    for i in range(num_samples):
        rng = np.random.default_rng((seed, index, i))
        samples.append(build(rng, i, f"{category}_{seed}_{i:06d}"))
    return samples


# ------------------------------------------------------------------------ conversation glue


def _answer(rng: np.random.Generator, qa: _QA) -> str:
    _, answer, reasoning = qa
    if reasoning is not None and rng.random() < 0.5:
        return f"<think>{reasoning}</think>{answer}"
    return answer


def _build(
    rng: np.random.Generator,
    i: int,
    key: str,
    media_parts: list[dict],
    qas: list[_QA],
    members: dict[str, bytes],
    media_truth: dict[str, tuple[str, dict | list]],
    max_turns: int = 2,
) -> SynthSample:
    """Assemble the turns: media and the first question in the first user turn, follow-up
    questions as plain-text user turns; ``truth`` is listed in part order."""
    turns: list[dict] = []
    if i % 3 == 0:
        turns.append({"role": "system", "content": _SYSTEM_PROMPTS[int(rng.integers(3))]})
    num_turns = 1 + int(rng.integers(max_turns)) if len(qas) > 1 else 1
    chosen = [qas[j] for j in rng.permutation(len(qas))[: min(num_turns, len(qas))]]
    for n, qa in enumerate(chosen):
        if n == 0 and media_parts:
            question = {"type": "text", "text": qa[0]}
            first = rng.random() < 0.75  # media usually precedes the question
            content: str | list = media_parts + [question] if first else [question] + media_parts
        else:
            content = qa[0]
        turns.append({"role": "user", "content": content})
        turns.append({"role": "assistant", "content": _answer(rng, qa)})

    truth: dict = {"images": [], "videos": [], "audio": []}
    for part in media_parts:
        if part["type"] in ("image", "video", "audio"):
            bucket, record = media_truth[part["member"]]
            truth[bucket].append(record)
    return SynthSample(key, {"conversation": turns}, members, truth)


# ----------------------------------------------------------------------------------- pixels


def _two_colours(rng: np.random.Generator) -> tuple[str, str]:
    names = list(_COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    return names[fg], names[bg]


def _draw_shape(
    rng: np.random.Generator,
    width: int,
    height: int,
    shape: str,
    colour: str,
    background: str,
    scale: tuple[float, float] = (0.45, 0.8),  # the side, relative to the shorter edge
) -> np.ndarray:
    img = Image.new("RGB", (width, height), _COLOURS[background])
    draw = ImageDraw.Draw(img)
    side = max(8, int(min(width, height) * rng.uniform(*scale)))
    side = min(side, width, height)
    x0 = int(rng.integers(0, width - side + 1))
    y0 = int(rng.integers(0, height - side + 1))
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    fill = _COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon(
            [(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill
        )
    return np.asarray(img, dtype=np.uint8).copy()


def _article(word: str) -> str:
    if len(word) == 1:  # note letters are read out: "an A", "an F", "a G"
        return "an" if word in "AEFHLMNORSX" else "a"
    return "an" if word[0] in "aeiou" else "a"


def _image_size(rng: np.random.Generator, extreme: bool) -> tuple[int, int]:
    if extreme:
        sizes = ((320, 24), (24, 320), (300, 30), (32, 288), (320, 40))
        return sizes[int(rng.integers(len(sizes)))]
    return int(rng.integers(24, 321)), int(rng.integers(24, 321))


def _encode_image(rgb: np.ndarray, name: str) -> bytes:
    return encode_png(rgb) if name.endswith(".png") else encode_jpeg(rgb, quality=90)


def _image_sample(rng: np.random.Generator, i: int, key: str) -> SynthSample:
    width, height = _image_size(rng, extreme=i % 6 == 5)
    shape = _SHAPES[int(rng.integers(len(_SHAPES)))]
    colour, background = _two_colours(rng)
    name = "img0.png" if i % 2 == 0 else "img0.jpg"
    pixels = _draw_shape(rng, width, height, shape, colour, background)
    wide = "wide" if width > height else "tall" if height > width else "square"
    qas: list[_QA] = [
        (
            "What colour is the shape in the picture?",
            f"The shape is {colour}.",
            f"The {shape} stands out from the {background} background; its fill is {colour}.",
        ),
        (
            "What shape is drawn?",
            f"It is {_article(colour)} {colour} {shape}.",
            f"The outline has {_SHAPE_REASON[shape]}, so it is a {shape}.",
        ),
        ("What colour is the background?", f"The background is {background}.", None),
        (
            "Describe the image.",
            f"{_article(colour).capitalize()} {colour} {shape} on a {background} background.",
            f"I see one {shape}. It is {colour}. Everything else is {background}.",
        ),
        (
            "Is the picture wider than it is tall?",
            "Yes, it is wider than it is tall." if wide == "wide" else "No, it is not.",
            f"The picture is {width} pixels wide and {height} pixels tall.",
        ),
    ]
    part = {"type": "image", "member": name}
    truth = {name: ("images", [width, height])}
    return _build(rng, i, key, [part], qas, {name: _encode_image(pixels, name)}, truth, 3)


def _multi_image_sample(rng: np.random.Generator, i: int, key: str) -> SynthSample:
    count = 2 + int(rng.integers(2))
    shapes = [_SHAPES[j] for j in rng.permutation(len(_SHAPES))[:count]]
    parts: list[dict] = []
    members: dict[str, bytes] = {}
    truth: dict[str, tuple[str, dict | list]] = {}
    colours = []
    for n, shape in enumerate(shapes):
        width, height = _image_size(rng, extreme=False)
        colour, background = _two_colours(rng)
        colours.append(colour)
        name = f"img{n}.png" if (i + n) % 2 == 0 else f"img{n}.jpg"
        members[name] = _encode_image(
            _draw_shape(rng, width, height, shape, colour, background), name
        )
        truth[name] = ("images", [width, height])
        parts += [{"type": "text", "text": f"Image {n + 1}:"}, {"type": "image", "member": name}]
    target = int(rng.integers(count))
    listing = "; ".join(f"image {n + 1} shows a {s}" for n, s in enumerate(shapes))
    same = len(set(colours)) == 1
    red = sum(c == "red" for c in colours)
    qas: list[_QA] = [
        (
            f"Which image shows a {shapes[target]}?",
            f"Image {target + 1} shows the {shapes[target]}.",
            listing.capitalize() + ".",
        ),
        (
            "Do all the shapes have the same colour?",
            "Yes, they all have the same colour."
            if same
            else "No. The colours are " + ", ".join(colours) + ".",
            None,
        ),
        (
            "How many images are there, and how many show a red shape?",
            f"There are {count} images; {_NUMBER_WORDS[red]} of them "
            f"{'shows' if red == 1 else 'show'} a red shape.",
            "The shapes are " + ", ".join(colours) + ".",
        ),
        (
            "List the shapes in order.",
            ", ".join(shapes).capitalize() + ".",
            listing.capitalize() + ".",
        ),
    ]
    return _build(rng, i, key, parts, qas, members, truth, 2)


_PAGE_W, _PAGE_H = 96, 128


def _draw_page(rng: np.random.Generator, lines: int, number: int) -> np.ndarray:
    """A white page with ``lines`` dark text bars and ``number`` small ticks as its footer."""
    page = np.full((_PAGE_H, _PAGE_W, 3), 250, dtype=np.uint8)
    ink = int(rng.integers(10, 60))
    for n in range(lines):
        top = 10 + n * 10
        length = int(rng.integers(30, _PAGE_W - 16)) if n < lines - 1 else int(rng.integers(20, 50))
        page[top : top + 5, 8 : 8 + length] = ink
    for n in range(number):  # page number as a row of ticks, bottom right
        left = _PAGE_W - 10 - n * 5
        page[_PAGE_H - 10 : _PAGE_H - 5, left : left + 2] = ink
    return page


def _document_sample(rng: np.random.Generator, i: int, key: str) -> SynthSample:
    pages = 3 + int(rng.integers(3))
    # distinct line counts, so "which page has the most lines" has exactly one answer
    lines = [int(n) for n in 3 + rng.permutation(8)[:pages]]
    parts: list[dict] = []
    members: dict[str, bytes] = {}
    truth: dict[str, tuple[str, dict | list]] = {}
    for n in range(pages):
        name = f"page{n}.png"
        members[name] = encode_png(_draw_page(rng, lines[n], n + 1))
        truth[name] = ("images", [_PAGE_W, _PAGE_H])
        parts.append({"type": "image", "member": name})
    most = int(np.argmax(lines))
    asked = int(rng.integers(pages))
    counts = ", ".join(f"page {n + 1} has {c}" for n, c in enumerate(lines))
    qas: list[_QA] = [
        (
            "How many pages does this document have?",
            f"The document has {pages} pages.",
            f"I count the pages one by one: {', '.join(str(n + 1) for n in range(pages))}.",
        ),
        (
            "Which page has the most lines of text?",
            f"Page {most + 1}, with {lines[most]} lines.",
            counts.capitalize() + ".",
        ),
        (
            f"How many lines of text are on page {asked + 1}?",
            f"Page {asked + 1} has {lines[asked]} lines of text.",
            None,
        ),
        (
            "How many lines of text are there in total?",
            f"There are {sum(lines)} lines in total.",
            f"{' + '.join(map(str, lines))} = {sum(lines)}.",
        ),
    ]
    return _build(rng, i, key, parts, qas, members, truth, 2)


def _moving_square(
    rng: np.random.Generator, num_frames: int, width: int, height: int
) -> tuple[np.ndarray, str, str, str]:
    colour, background = _two_colours(rng)
    direction = list(_DIRECTIONS)[int(rng.integers(len(_DIRECTIONS)))]
    (sx, sy), (ex, ey) = _DIRECTIONS[direction]
    side = max(6, min(width, height) // 4)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = _COLOURS[background]
    for f in range(num_frames):
        u = f / (num_frames - 1)
        x = round(((1 - u) * sx + u * ex) * (width - side))
        y = round(((1 - u) * sy + u * ey) * (height - side))
        frames[f, y : y + side, x : x + side] = _COLOURS[colour]
    return frames, colour, background, direction


def _video_geometry(rng: np.random.Generator, i: int) -> tuple[int, int, int, int]:
    num_frames = 2 + i % 8  # every count 2..9, odd ones included, in every 8 samples
    fps = 2 + int(rng.integers(3))
    width, height = 2 * int(rng.integers(16, 81)), 2 * int(rng.integers(16, 81))
    return num_frames, fps, width, height


def _video_qas(colour: str, background: str, direction: str, num_frames: int, fps: int):
    return [
        (
            "Which way does the square move?",
            f"It moves from {direction}.",
            f"The square starts near the {direction.split()[0]} edge and ends near the "
            f"{direction.split()[-1]} edge.",
        ),
        ("What colour is the moving square?", f"The square is {colour}.", None),
        (
            "Describe the clip.",
            f"{_article(colour).capitalize()} {colour} square moves from {direction} over a "
            f"{background} background.",
            None,
        ),
        (
            "How long is the clip?",
            f"About {num_frames / fps:.1f} seconds.",
            f"It has {num_frames} frames at {fps} frames per second.",
        ),
    ]


def _video_sample(rng: np.random.Generator, i: int, key: str) -> SynthSample:
    num_frames, fps, width, height = _video_geometry(rng, i)
    frames, colour, background, direction = _moving_square(rng, num_frames, width, height)
    name = "clip.mp4"
    record = {"num_frames": num_frames, "fps": fps, "width": width, "height": height}
    record["has_audio"] = False
    qas = _video_qas(colour, background, direction, num_frames, fps)
    members = {name: encode_mp4(frames, fps)}
    part = {"type": "video", "member": name}
    return _build(rng, i, key, [part], qas, members, {name: ("videos", record)}, 2)


# ------------------------------------------------------------------------------------ sound


def _tones(notes: list[str], num_samples: int, rate: int, amplitude: float) -> np.ndarray:
    """Equal-length sine tones in sequence, with 10 ms fades so the joins do not click."""
    return _sine([_NOTES[note] for note in notes], num_samples, rate, amplitude)


def _sine(freqs: list[float], num_samples: int, rate: int, amplitude: float) -> np.ndarray:
    """:func:`_tones` by frequency (Hz)."""
    wave = np.zeros(num_samples, dtype=np.float64)
    bounds = np.linspace(0, num_samples, len(freqs) + 1).astype(int)
    fade = max(1, rate // 100)
    for freq, start, end in zip(freqs, bounds[:-1], bounds[1:], strict=True):
        idx = np.arange(end - start)
        ramp = np.minimum(1.0, np.minimum(idx + 1, end - start - idx) / fade)
        wave[start:end] = np.sin(2 * np.pi * freq * idx / rate) * ramp
    return (amplitude * wave).astype(np.float32)


def _note_qas(notes: list[str], seconds: float) -> list[_QA]:
    names = ", ".join(notes)
    pitch = [_NOTES[n] for n in notes]
    qas: list[_QA] = [
        (
            "What note is played first?",
            f"The first note is {_article(notes[0])} {notes[0]}.",
            f"The first tone is a sine at about {round(pitch[0])} Hz, which is {notes[0]}.",
        ),
        (
            "How many tones do you hear?",
            f"I hear {_NUMBER_WORDS[len(notes)]} tone{'s' if len(notes) > 1 else ''}.",
            f"The notes are {names}." if len(notes) > 1 else f"There is one steady {names}.",
        ),
        ("How long is the recording?", f"About {seconds:.1f} seconds.", None),
    ]
    if len(notes) > 1 and pitch[-1] != pitch[0]:
        up = pitch[-1] > pitch[0]
        qas.append(
            (
                "Does the pitch go up or down?",
                f"It goes {'up' if up else 'down'}, from {notes[0]} to {notes[-1]}.",
                f"The notes are {names}.",
            )
        )
    return qas


def _audio_sample(rng: np.random.Generator, i: int, key: str) -> SynthSample:
    long_clip = i % 8 == 7  # so that clips longer than the encoder's 30 s window get split
    seconds = rng.uniform(31.0, 35.0) if long_clip else rng.uniform(0.5, 3.0)
    rate = _AUDIO_RATES[int(rng.integers(len(_AUDIO_RATES)))]
    channels = 2 if i % 4 == 2 else 1
    fmt = _AUDIO_FORMATS[i % len(_AUDIO_FORMATS)]
    num_samples = int(round(seconds * rate))
    note_names = list(_NOTES)
    notes = [note_names[int(n)] for n in rng.integers(len(note_names), size=1 + rng.integers(3))]
    wave = _tones(notes, num_samples, rate, float(rng.uniform(0.3, 0.6)))
    if channels == 2:  # same tone, unequal loudness left and right
        wave = np.stack([wave, wave * np.float32(rng.uniform(0.4, 0.9))], axis=1)
    encode = {"wav": encode_wav, "flac": encode_flac, "mp3": encode_mp3}[fmt]
    name = f"audio0.{fmt}"
    record = {"num_samples": num_samples, "sample_rate": rate, "channels": channels}
    part = {"type": "audio", "member": name}
    members = {name: encode(wave, rate)}
    qas = _note_qas(notes, num_samples / rate)
    return _build(rng, i, key, [part], qas, members, {name: ("audio", record)}, 2)


def _audio_video_sample(rng: np.random.Generator, i: int, key: str) -> SynthSample:
    num_frames, fps, width, height = _video_geometry(rng, i)
    frames, colour, background, direction = _moving_square(rng, num_frames, width, height)
    rate = _AUDIO_RATES[int(rng.integers(len(_AUDIO_RATES)))]
    audio_samples = round(num_frames * rate / fps)  # the track spans the video exactly
    note = list(_NOTES)[int(rng.integers(len(_NOTES)))]
    wave = _tones([note], audio_samples, rate, float(rng.uniform(0.3, 0.6)))
    name = "clip.mp4"
    record = {
        "num_frames": num_frames,
        "fps": fps,
        "width": width,
        "height": height,
        "has_audio": True,
        "audio_samples": audio_samples,
        "audio_rate": rate,
    }
    qas = _video_qas(colour, background, direction, num_frames, fps)
    qas.append(
        (
            "What note does the tone in the clip play?",
            f"It plays {_article(note)} {note}.",
            f"The soundtrack is a steady sine at about {round(_NOTES[note])} Hz.",
        )
    )
    qas.append(
        (
            "What do you see and hear?",
            f"{_article(colour).capitalize()} {colour} square moving from {direction}, with a "
            f"steady {note} tone.",
            None,
        )
    )
    members = {name: encode_mp4(frames, fps, audio=wave, sample_rate=rate)}
    part = {"type": "video", "member": name, "audio": True}
    return _build(rng, i, key, [part], qas, members, {name: ("videos", record)}, 2)


# ------------------------------------------------------------------------------------- text


def _text_sample(rng: np.random.Generator, i: int, key: str) -> SynthSample:
    a, b = (int(x) for x in rng.integers(2, 60, size=2))
    word = _WORDS[int(rng.integers(len(_WORDS)))]
    numbers = [int(x) for x in rng.permutation(20)[:4]]
    qas: list[_QA] = [
        (f"What is {a} plus {b}?", f"{a + b}.", f"{a} + {b} = {a + b}."),
        (
            f"Which is larger, {a} or {b}?",
            f"{max(a, b)} is larger." if a != b else "They are equal.",
            f"{max(a, b)} - {min(a, b)} = {abs(a - b)}, which is "
            f"{'positive' if a != b else 'zero'}.",
        ),
        (
            f"How many letters are in the word '{word}'?",
            f"The word '{word}' has {len(word)} letters.",
            f"Spelled out: {'-'.join(word)}. That is {len(word)} letters.",
        ),
        (f"Spell '{word}' backwards.", word[::-1], None),
        (
            f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}.",
            ", ".join(map(str, sorted(numbers))) + ".",
            f"The smallest is {min(numbers)} and the largest is {max(numbers)}.",
        ),
    ]
    return _build(rng, i, key, [], qas, {}, {}, 3)


_BUILDERS: dict[str, Callable[[np.random.Generator, int, str], SynthSample]] = {
    "text": _text_sample,
    "image": _image_sample,
    "multi_image": _multi_image_sample,
    "document": _document_sample,
    "video": _video_sample,
    "audio": _audio_sample,
    "audio_video": _audio_video_sample,
}
