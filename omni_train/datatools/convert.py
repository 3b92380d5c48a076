"""``omni-train data convert``: the formats users have -> an energon dataset.

Inputs (by file suffix): ``.jsonl`` (one row per line), ``.json`` (a list of rows) and
``.parquet`` (rows of any schema, as exported by Hugging Face ``datasets``). Each row's format
is recognised by its keys, so one file may mix them:

- **omni-train** (``conversation``): the native format (docs/data_format.md); media parts name
  files under ``--media`` in ``member``.
- **LLaVA / ShareGPT** (``conversations`` of ``{"from": "human"|"gpt"|"system", "value": ...}``):
  ``<image>``/``<video>``/``<audio>`` tags in the text mark where the row's ``image``/``images``,
  ``video``/``videos`` and ``audio``/``audios`` go, in order. Without any tag, the media open
  the first user turn (LLaVA's convention). More tags than media, or the reverse, is
  ``placeholder_mismatch``.
- **OpenAI / ShareGPT messages** (``messages`` of ``{"role", "content"}``): string content with
  tags as above (LLaMA-Factory's layout), or typed parts: ``text``, ``image_url`` /
  ``video_url`` (``{"url": path | data URI}``), ``input_audio`` (``{"data": base64}``), and
  ``image`` / ``video`` / ``audio`` with a path or bytes.
- **NeMo ASR manifests** (``audio_filepath``, ``duration``, ``text``, optional ``offset``): an
  ASR turn, ``--asr-prompt`` then the audio, answered by ``text``. A segment (``offset``, or a
  file longer than ``duration``) is cut out and stored as 16 kHz FLAC.
- **ASR rows** (``audio`` + ``text``, e.g. a Parquet export of an ASR dataset): as NeMo's.

Media are a path under ``--media`` (never outside it, never a URL), bytes, or Hugging Face's
``{"bytes": ..., "path": ...}`` (bytes win). Their type comes from the path's suffix or, for bytes
without one, from the file's signature. In the dataset they become members ``m0.png``, ...

A row that cannot be converted is skipped, logged with ``file:line`` (or ``file:row``) and
counted under one of :data:`CONVERT_REASONS`; never dropped silently. Rows stream: Parquet is read
in record batches and JSONL line by line (a ``.json`` list is parsed whole: text only, its media
stay on disk); rows are converted by ``--workers`` processes in windows, so memory holds one
window of samples; samples are written in input order, so the dataset does not depend on the
number of workers. Written by hand: no library we use converts these formats to energon shards.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omni_train.data.conversation import MEDIA_KINDS
from omni_train.data.media_io import MediaError, decode_audio
from omni_train.datatools.encode import encode_flac
from omni_train.datatools.prepare import EXTENSIONS, KEY, DatasetWriter, RawSample, is_val
from omni_train.log import get_logger

log = get_logger()

# Why a row was not converted (stable strings: printed and returned as counts).
CONVERT_REASONS = (
    "bad_encoding",  # the line is not UTF-8
    "bad_json",  # not JSON, or not an object
    "unknown_format",  # no known row format: no conversation, messages, manifest or ASR keys
    "bad_conversation",  # a known format with malformed turns (role, content)
    "bad_key",  # a key webdataset cannot carry (letters, digits, '_' and '-' only)
    "duplicate_key",
    "placeholder_mismatch",  # media tags in the text and the row's media do not pair up
    "bad_extension",  # a media file of a type omni-train does not read
    "outside_media",  # an absolute path, or one that leaves the --media folder
    "remote_media",  # a URL: conversion never downloads
    "missing_media",  # the media file does not exist, or no --media folder for a path
    "bad_media",  # media bytes of unknown type, bad base64, or audio that cannot be cut
)
TAGS = {"<image>": "image", "<video>": "video", "<audio>": "audio"}
_TAG = re.compile("|".join(re.escape(t) for t in TAGS))
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ROLES |= {"model": "assistant", "bot": "assistant", "system": "system"}


class ConvertError(ValueError):
    def __init__(self, reason: str, message: str):
        assert reason in CONVERT_REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Options:
    media_root: Path | None
    asr_prompt: str = "Transcribe the audio."
    sample_rate: int = 16000  # the rate a cut ASR segment is stored at


# ---- reading rows -------------------------------------------------------------------------


def iter_rows(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, row)`` per row of ``path``; ``row`` is a dict, or a ConvertError for a row that
    cannot even be read."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                n += 1
                yield f"{path}:row {n}", row
    elif suffix == ".json":
        try:
            rows = json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a JSON list of rows ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        for n, row in enumerate(rows, 1):
            yield f"{path}:row {n}", row
    else:  # .jsonl and anything else: one JSON document per line
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield f"{path}:{n}", ConvertError("bad_encoding", str(e))
                    continue
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{n}", ConvertError("bad_json", f"not JSON ({e})")


# ---- one row -> a sample ------------------------------------------------------------------


def convert_row(row, default_key: str, opts: Options) -> RawSample:
    """One row in any known format -> a sample, or raise ConvertError."""
    if isinstance(row, ConvertError):
        raise row
    if not isinstance(row, dict):
        raise ConvertError("bad_json", f"expected an object, got {type(row).__name__}")
    key = _key(row, default_key)
    if "conversation" in row:
        turns = _native(row)
    elif "conversations" in row:
        turns = _tagged(row, row["conversations"], "from", "value")
    elif "messages" in row:
        turns = _messages(row)
    elif "audio_filepath" in row or ("audio" in row and "text" in row):
        turns = _asr(row, opts)
    else:
        raise ConvertError(
            "unknown_format",
            f"keys {sorted(row)[:8]}: expected conversation, conversations, messages, "
            "audio_filepath or audio+text",
        )
    members: dict[str, bytes] = {}
    named: dict[object, str] = {}
    for turn in turns:
        for part in turn["content"] if isinstance(turn["content"], list) else []:
            if part.get("type") in MEDIA_KINDS:
                part["member"] = _member(part.pop("source"), members, named, opts)
                if "audio_source" in part:
                    part["audio"] = _member(part.pop("audio_source"), members, named, opts)
    return RawSample(key, {"conversation": turns}, members)


def _key(row: dict, default: str) -> str:
    if "key" in row:
        key = str(row["key"])
        if not KEY.match(key):
            raise ConvertError("bad_key", f"key {key!r}: use letters, digits, '_' or '-' (no dots)")
        return key
    if row.get("id") not in (None, ""):  # LLaVA-style ids may hold '/' or '.': made safe
        return re.sub(r"[^A-Za-z0-9_-]", "_", str(row["id"]))
    return default


def _native(row: dict) -> list[dict]:
    turns = row["conversation"]
    if not isinstance(turns, list):
        raise ConvertError("bad_json", "expected an object with a 'conversation' list")
    out = json.loads(json.dumps(turns))  # a copy we may rewrite
    for turn in out:
        for part in turn.get("content", []) if isinstance(turn, dict) else []:
            if isinstance(part, dict) and part.get("type") in MEDIA_KINDS:
                part["source"] = str(part.pop("member", ""))
                if isinstance(part.get("audio"), str):
                    part["audio_source"] = part.pop("audio")
    return out


def _media_lists(row: dict) -> dict[str, list]:
    """The row's media per kind, from ``image``/``images``, ``video``/``videos``,
    ``audio``/``audios``."""
    out = {}
    for kind in MEDIA_KINDS:
        items = []
        for name in (kind, kind + "s"):
            value = row.get(name)
            if value is None:
                continue
            items += value if isinstance(value, list) else [value]
        out[kind] = items
    return out


def _tagged(row: dict, turns, role_key: str, text_key: str) -> list[dict]:
    """Turns whose text carries ``<image>``-style tags, paired in order with the row's media."""
    if not isinstance(turns, list) or not turns:
        raise ConvertError("bad_conversation", "expected a non-empty list of turns")
    media = _media_lists(row)
    num_tags = Counter()
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise ConvertError("bad_conversation", f"turn {i} needs '{role_key}' and '{text_key}'")
        role = ROLES.get(str(turn.get(role_key)).lower())
        if role is None:
            raise ConvertError("bad_conversation", f"turn {i}: unknown role {turn.get(role_key)!r}")
        parts = []
        text = turn[text_key]
        pos = 0
        for m in _TAG.finditer(text):
            parts.append({"type": "text", "text": text[pos : m.start()]})
            kind = TAGS[m.group()]
            parts.append({"type": kind, "index": num_tags[kind]})
            num_tags[kind] += 1
            pos = m.end()
        parts.append({"type": "text", "text": text[pos:]})
        out.append({"role": role, "parts": parts})
    untagged = not sum(num_tags.values())
    if untagged and any(media.values()):
        first = next((t for t in out if t["role"] == "user"), None)
        if first is None:
            raise ConvertError("placeholder_mismatch", "the row has media but no user turn")
        lead = [{"type": k, "index": i} for k in MEDIA_KINDS for i in range(len(media[k]))]
        first["parts"] = lead + first["parts"]
        num_tags = Counter({k: len(v) for k, v in media.items()})
    for kind in MEDIA_KINDS:
        if num_tags[kind] != len(media[kind]):
            raise ConvertError(
                "placeholder_mismatch",
                f"{num_tags[kind]} <{kind}> tags but {len(media[kind])} {kind} item(s)",
            )
    return [_turn(t["role"], t["parts"], media) for t in out]


def _turn(role: str, parts: list[dict], media: dict[str, list]) -> dict:
    content = []
    for p in parts:
        if p["type"] == "text":
            text = p["text"].strip()  # the newline after a tag: parts are joined by one anyway
            if text:
                content.append({"type": "text", "text": text})
        else:
            content.append({"type": p["type"], "source": media[p["type"]][p["index"]]})
    if all(p["type"] == "text" for p in content):
        return {"role": role, "content": "\n".join(p["text"] for p in content)}
    return {"role": role, "content": content}


def _messages(row: dict) -> list[dict]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConvertError("bad_conversation", "expected a non-empty 'messages' list")
    if all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return _tagged(row, messages, "role", "content")  # LLaMA-Factory: tags + media lists
    out = []
    for i, m in enumerate(messages):
        role = ROLES.get(str(m.get("role")).lower()) if isinstance(m, dict) else None
        if role is None:
            raise ConvertError("bad_conversation", f"message {i}: unknown role")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ConvertError("bad_conversation", f"message {i}: content must be text or parts")
        parts = [_openai_part(i, p) for p in content]
        out.append({"role": role, "content": [p for p in parts if p is not None]})
    return out


def _openai_part(i: int, part) -> dict | None:
    if not isinstance(part, dict):
        raise ConvertError("bad_conversation", f"message {i}: a part must be an object")
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind in ("image_url", "video_url"):
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        return {"type": kind[:-4], "source": _url(str(url))}
    if kind == "input_audio":
        value = part.get("input_audio") or {}
        try:
            data = base64.b64decode(value.get("data", ""), validate=True)
        except ValueError:
            raise ConvertError("bad_media", f"message {i}: input_audio is not base64") from None
        return {"type": "audio", "source": {"bytes": data, "path": f"a.{value.get('format', '')}"}}
    if kind in MEDIA_KINDS:
        for name in (kind, "path", "url", "bytes"):
            if part.get(name) is not None:
                value = part[name]
                return {"type": kind, "source": _url(value) if isinstance(value, str) else value}
        raise ConvertError("bad_conversation", f"message {i}: a {kind} part without its media")
    raise ConvertError("bad_conversation", f"message {i}: unknown part type {kind!r}")


def _url(url: str):
    """A path, ``file://`` path or ``data:`` URI -> a media source."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        try:
            raw = base64.b64decode(data, validate=True) if ";base64" in head else data.encode()
        except ValueError:
            raise ConvertError("bad_media", "a data: URI that is not base64") from None
        return {"bytes": raw, "path": ""}
    if url.startswith("file://"):
        return url[len("file://") :]
    if re.match(r"^[a-z][a-z0-9+.-]*://", url):
        raise ConvertError("remote_media", f"{url}: conversion does not download media")
    return url


def _asr(row: dict, opts: Options) -> list[dict]:
    text = row.get("text")
    if not isinstance(text, str):
        raise ConvertError("bad_conversation", "an ASR row needs 'text'")
    source = _cut(row, opts) if "audio_filepath" in row else row["audio"]
    user = [{"type": "text", "text": opts.asr_prompt}, {"type": "audio", "source": source}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": text}]


def _cut(row: dict, opts: Options):
    """A NeMo manifest's audio: the file, or its ``[offset, offset + duration)`` segment."""
    path = str(row["audio_filepath"])
    offset = float(row.get("offset") or 0.0)
    duration = row.get("duration")
    if offset <= 0 and duration is None:
        return path
    data = _read(path, opts)
    import soundfile as sf

    try:
        length = sf.info(io.BytesIO(data)).duration
    except (RuntimeError, TypeError, ValueError):
        length = None
    if offset <= 0 and length is not None and float(duration) >= length - 0.01:
        return {"bytes": data, "path": path}  # the whole file, as read

    try:
        wav = decode_audio(data, opts.sample_rate).numpy()
    except MediaError as e:
        raise ConvertError("bad_media", f"{path}: {e}") from None
    start = round(offset * opts.sample_rate)
    stop = len(wav) if duration is None else start + round(float(duration) * opts.sample_rate)
    if start >= len(wav) or stop <= start:
        raise ConvertError("bad_media", f"{path}: offset {offset} s is past its {len(wav)} samples")
    return {"bytes": encode_flac(wav[start:stop], opts.sample_rate), "path": "segment.flac"}


# ---- media sources -> members -------------------------------------------------------------

_SIGNATURES = (
    (b"\x89PNG", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF8", "gif"),
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
    (b"\x1aE\xdf\xa3", "mkv"),
)


def _sniff(data: bytes) -> str | None:
    for magic, ext in _SIGNATURES:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] in (b"WEBP", b"WAVE"):
        return "webp" if data[8:12] == b"WEBP" else "wav"
    if data[4:8] == b"ftyp":
        return "m4a" if data[8:11] == b"M4A" else "mp4"
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "mp3"  # an MPEG audio frame sync without an ID3 tag
    return None


def _read(path: str, opts: Options) -> bytes:
    if opts.media_root is None:
        raise ConvertError("missing_media", f"media path {path!r} but no --media folder")
    root = opts.media_root
    file = (root / path).resolve()
    if Path(path).is_absolute() or not file.is_relative_to(root.resolve()):
        raise ConvertError("outside_media", f"media path {path!r} is not under {root}")
    suffix = file.suffix.lower().lstrip(".")
    if suffix not in EXTENSIONS:
        raise ConvertError(
            "bad_extension", f"{path}: .{suffix} is not one of {', '.join(EXTENSIONS)}"
        )
    if not file.is_file():
        raise ConvertError("missing_media", f"media file {file} does not exist")
    return file.read_bytes()


def _member(source, members: dict, named: dict, opts: Options) -> str:
    """Store one media source as a member (the same path twice is stored once)."""
    ident = source if isinstance(source, str) else id(source)
    if ident in named:
        return named[ident]
    if isinstance(source, str):
        if re.match(r"^[a-z][a-z0-9+.-]*://", source):
            raise ConvertError("remote_media", f"{source}: conversion does not download media")
        data, ext = _read(source, opts), Path(source).suffix.lower().lstrip(".")
    else:
        if isinstance(source, dict):
            data, path = source.get("bytes"), source.get("path") or ""
            if data is None and path:
                return _member(str(path), members, named, opts)
        else:
            data, path = source, ""
        if not isinstance(data, bytes | bytearray) or not data:
            raise ConvertError("bad_media", f"a media item of type {type(data).__name__}")
        data = bytes(data)
        ext = Path(str(path)).suffix.lower().lstrip(".")
        if ext not in EXTENSIONS:
            ext = _sniff(data)
        if ext is None:
            raise ConvertError("bad_media", "media bytes of unknown type (no known signature)")
    name = f"m{len(members)}.{'jpg' if ext == 'jpeg' else ext}"
    members[name] = data
    named[ident] = name
    return name


# ---- the whole file -----------------------------------------------------------------------


def _work(item: tuple) -> tuple[str, object]:
    where, row, default_key, opts = item
    try:
        return where, convert_row(row, default_key, opts)
    except ConvertError as e:
        return where, e


def convert(
    path: str | Path,
    media_root: str | Path | None,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.02,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    workers: int = 1,
    asr_prompt: str = "Transcribe the audio.",
    window: int = 256,
) -> dict:
    """Rows of ``path`` (any format above) -> an energon dataset at ``out_dir``, written beside
    it and renamed into place. Returns ``converted``, ``train``, ``val`` and ``skipped``
    (reason -> count)."""
    path, out = Path(path), Path(out_dir)
    root = Path(media_root) if media_root is not None else None
    opts = Options(root, asr_prompt)
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    counts = Counter()

    def items() -> Iterator[tuple]:
        for n, (where, row) in enumerate(iter_rows(path), 1):
            yield where, row, f"{_stem(path)}_{n:09d}", opts

    def results() -> Iterator[tuple[str, object]]:
        if workers <= 1:
            yield from map(_work, items())
            return
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with ctx.Pool(workers) as pool:
            batch: list[tuple] = []
            for item in items():
                batch.append(item)
                if len(batch) == window * workers:
                    yield from pool.map(_work, batch, chunksize=max(1, window // 4))
                    batch = []
            yield from pool.map(_work, batch, chunksize=max(1, window // 4))

    protect = [root] if root is not None else []
    with DatasetWriter(out, samples_per_shard, overwrite=overwrite, protect=protect) as writer:
        for where, result in results():
            if isinstance(result, RawSample) and result.key in seen:
                result = ConvertError("duplicate_key", f"key {result.key} seen before")
            if isinstance(result, ConvertError):
                skipped[result.reason] += 1
                log.warning("%s not converted (%s): %s", where, result.reason, result)
                continue
            seen.add(result.key)
            val = is_val(result.key, val_fraction)
            writer.add(result, val=val)
            counts["val" if val else "train"] += 1
    return {
        "converted": counts["train"] + counts["val"],
        "train": counts["train"],
        "val": counts["val"],
        "skipped": dict(sorted(skipped.items())),
    }


def _stem(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
    return stem or hashlib.sha256(str(path).encode()).hexdigest()[:8]


def sample_from_line(line: str, root: Path, default_key: str) -> RawSample:
    """One JSONL line (any format) -> a sample, or raise ConvertError (``data show``, the HF
    comparison)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConvertError("bad_json", f"not JSON ({e})") from None
    return convert_row(row, default_key, Options(root))
