"""Bad input for ``omni-train data convert`` and the stage that reads its result: one row per way
a row can fail to convert, media the encoders refuse, and good rows in every accepted format
(PNG, GIF, WebP, WAV, MP4).

``write(root)`` -> (jsonl, media folder, expected): ``expected["skipped"]`` is what convert must
count per reason, ``expected["converted"]`` the rows it keeps, ``expected["planning"]`` what the
stage must skip when it plans the converted samples, ``expected["good"]`` the keys it trains on.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from omni_train.datatools.encode import encode_mp4, encode_png, encode_wav

RNG = np.random.default_rng(7)


def _image(fmt: str) -> bytes:
    rgb = RNG.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    if fmt == "png":
        return encode_png(rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt.upper())
    return buf.getvalue()


def _wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return encode_wav((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000)


def _row(key: str | None, *media: dict, text: str = "What is it?") -> dict:
    user = {"role": "user", "content": [{"type": "text", "text": text}, *media]}
    doc = {"conversation": [user, {"role": "assistant", "content": f"It is {key}."}]}
    return doc if key is None else {"key": key, **doc}


def write(root: str | Path) -> tuple[Path, Path, dict]:
    root = Path(root)
    media = root / "media"
    media.mkdir(parents=True)
    files = {
        "a.png": _image("png"),
        "b.gif": _image("gif"),
        "c.webp": _image("webp"),
        "tone.wav": _wav(1.5),
        "blip.wav": _wav(0.01),  # one encoder frame: refused when the sample is planned
        "clip.mp4": encode_mp4(RNG.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), 2),
        "x.bmp": b"BM" + b"\0" * 64,  # an extension omni-train does not read
    }
    for name, data in files.items():
        (media / name).write_bytes(data)
    (root / "outside.png").write_bytes(files["a.png"])

    def part(kind: str, path: str) -> dict:
        return {"type": kind, "member": path}

    good = [
        _row("blip", part("audio", "blip.wav")),  # first: rank 0's share (see test_faults)
        _row("png", part("image", "a.png")),
        _row("gif", part("image", "b.gif")),
        _row("webp", part("image", "c.webp")),
        _row("tone", part("audio", "tone.wav")),
        _row("clip", part("video", "clip.mp4")),
        _row("text_only"),
        _row("two_images", part("image", "a.png"), part("image", "b.gif")),
        _row("png_again", part("image", "a.png")),
    ]
    lines = [json.dumps(r).encode() for r in good]
    lines += [
        b'{"conversation": "caf\xe9"}',  # bad_encoding: Latin-1, not UTF-8
        b"{this is not json",  # bad_json
        json.dumps(_row("dotted.key")).encode(),  # bad_key
        json.dumps(_row("png")).encode(),  # duplicate_key
        json.dumps(_row("bitmap", part("image", "x.bmp"))).encode(),  # bad_extension
        json.dumps(_row("escape", part("image", "../outside.png"))).encode(),  # outside_media
        json.dumps(_row("absolute", part("image", str(root / "outside.png")))).encode(),
        json.dumps(_row("gone", part("image", "nope.png"))).encode(),  # missing_media
        b"",  # blank lines are not rows
    ]
    jsonl = root / "rows.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    expected = {
        "converted": len(good),
        "skipped": {
            "bad_encoding": 1,
            "bad_extension": 1,
            "bad_json": 1,
            "bad_key": 1,
            "duplicate_key": 1,
            "missing_media": 1,
            "outside_media": 2,
        },
        "planning": {"audio_too_short": 1},
        "good": sorted(r["key"] for r in good if r["key"] != "blip"),
    }
    return jsonl, media, expected


def write_unusable(root: Path, rows: int = 8) -> Path:
    """An energon dataset of ``rows`` image samples whose PNGs keep their header (so planning
    reads their size) but lose their pixel data (so decoding fails): converted from good rows,
    then cut, as a disk or a copy could damage them. A stage on it reads samples and can use
    none."""
    from omni_train.datatools.convert import convert
    from omni_train.datatools.prepare import RawSample, read_raw, write_dataset

    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        (media / f"img{i}.png").write_bytes(_image("png"))
        lines.append(json.dumps(_row(f"img{i}", {"type": "image", "member": f"img{i}.png"})))
    jsonl = root / "good.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    convert(jsonl, media, root / "good", val_fraction=0.0)
    cut = []
    for key, members in read_raw(root / "good"):
        conversation = json.loads(members.pop("json"))
        members = {k: v[: max(len(v) // 4, 64)] for k, v in members.items()}
        cut.append(RawSample(key, conversation, members))
    return write_dataset(root / "unusable", cut, [])
