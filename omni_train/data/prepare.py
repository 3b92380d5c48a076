"""Write energon-ready datasets: webdataset tar shards, then ``energon prepare``.

A sample is ``<key>.json`` (the conversation) plus ``<key>.<member>`` per media member, in one
tar. Shards are byte-deterministic (sorted keys, fixed tar metadata), so the same input makes
the same dataset. Train and validation samples go to separate shards (``train-*.tar``,
``val-*.tar``) and energon's own CLI indexes them with explicit split parts, so no split depends
on a ratio over a handful of shards.

:func:`convert_jsonl` turns the layout users already have - one JSON conversation per line,
media files in a folder - into such a dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from omni_train.data.conversation import MEDIA_KINDS
from omni_train.log import get_logger

log = get_logger()

KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset splits a name at its first dot: no dots
MEMBER = re.compile(r"^[a-z0-9_]+\.(png|jpg|jpeg|mp4|wav|flac|mp3|webm|mkv|ogg|m4a)$")


@dataclass(frozen=True)
class RawSample:
    key: str
    conversation: dict
    members: dict[str, bytes]  # member name (e.g. "img0.png") -> bytes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(
    samples: Iterable[RawSample], out_dir: Path, prefix: str, samples_per_shard: int
) -> list[str]:
    """Write ``<prefix>-NNNNNN.tar`` shards; returns their names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for chunk in _chunks(samples, samples_per_shard):
        names.append(f"{prefix}-{len(names):06d}.tar")
        with tarfile.open(out_dir / names[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in chunk:
                if not KEY.match(s.key):
                    raise ValueError(f"sample key {s.key!r}: use letters, digits, '_' or '-'")
                bad = [m for m in s.members if not MEMBER.match(m)]
                if bad:
                    raise ValueError(
                        f"sample {s.key}: member names {bad} must match {MEMBER.pattern}"
                    )
                _add(tar, f"{s.key}.json", json.dumps(s.conversation, sort_keys=True).encode())
                for member in sorted(s.members):
                    _add(tar, f"{s.key}.{member}", s.members[member])
    return names


def energon_prepare(out_dir: Path, splits: list[str]) -> None:
    """Index the shards with megatron-energon's ``energon prepare`` (its real CLI, called
    in-process: a subprocess would pay energon's import for every dataset)."""
    from megatron.energon.cli.main import main as energon_cli

    args = ["prepare", str(out_dir), "--non-interactive", "--force-overwrite", "--no-progress"]
    args += ["--sample-type", "CrudeWebdataset"]
    for split in splits:
        # a regex over shard paths; a split without shards stays empty
        args += ["--split-parts", f"{split}:{split}-[0-9]+\\.tar"]
    said = io.StringIO()  # energon prints its findings; keep them for an error message
    try:
        with contextlib.redirect_stdout(said):
            energon_cli(args, standalone_mode=False)
    except (Exception, SystemExit) as e:  # click exits; energon raises on bad shards
        raise RuntimeError(f"energon prepare {out_dir} failed: {e}\n{said.getvalue()}") from e


def write_dataset(
    out_dir: str | Path,
    train: Iterable[RawSample],
    val: Iterable[RawSample],
    samples_per_shard: int = 100,
) -> Path:
    """A complete energon dataset in ``out_dir`` (replaced if it exists)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    splits = {
        "train": write_shards(train, out, "train", samples_per_shard),
        "val": write_shards(val, out, "val", samples_per_shard),
    }
    if not splits["train"]:
        raise ValueError(f"{out}: no training samples")
    energon_prepare(out, list(splits))
    return out


def is_val(key: str, val_fraction: float) -> bool:
    """Deterministic split by key: the same sample lands in the same split every time."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


def convert_jsonl(
    jsonl: str | Path,
    media_root: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.02,
    samples_per_shard: int = 1000,
) -> dict:
    """JSONL conversations with media paths relative to ``media_root`` -> energon dataset.

    Each line is a conversation document (``docs/data_format.md``), optionally with a ``key``;
    media parts name files as paths under ``media_root``. Media are renamed to member names
    (``m0.jpg``, ``m1.wav``, ...). A line whose JSON is invalid or whose media file is missing
    is not converted; it is counted, and logged with its line number.
    """
    jsonl, root = Path(jsonl), Path(media_root)
    counts: Counter[str] = Counter()
    seen: set[str] = set()

    def read() -> Iterator[tuple[bool, RawSample]]:
        with jsonl.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    sample = _from_line(json.loads(line), root, f"{jsonl.stem}_{lineno:09d}")
                except (json.JSONDecodeError, ValueError, OSError) as e:
                    counts["skipped"] += 1
                    log.warning("%s:%d not converted: %s", jsonl, lineno, e)
                    continue
                if sample.key in seen:
                    counts["skipped"] += 1
                    log.warning("%s:%d not converted: duplicate key %s", jsonl, lineno, sample.key)
                    continue
                seen.add(sample.key)
                counts["converted"] += 1
                yield is_val(sample.key, val_fraction), sample

    samples = list(read())
    write_dataset(
        out_dir,
        (s for v, s in samples if not v),
        (s for v, s in samples if v),
        samples_per_shard,
    )
    counts["val"] = sum(v for v, _ in samples)
    counts["train"] = len(samples) - counts["val"]
    return dict(counts)


def _from_line(doc: dict, root: Path, default_key: str) -> RawSample:
    if not isinstance(doc, dict) or not isinstance(doc.get("conversation"), list):
        raise ValueError("expected an object with a 'conversation' list")
    key = str(doc.get("key", default_key))
    members: dict[str, bytes] = {}
    renamed: dict[str, str] = {}

    def member(path: str) -> str:
        if path not in renamed:
            file = root / path
            if not file.is_file():
                raise ValueError(f"media file {file} does not exist")
            name = f"m{len(renamed)}{file.suffix.lower()}"
            renamed[path] = name
            members[name] = file.read_bytes()
        return renamed[path]

    turns = json.loads(json.dumps(doc["conversation"]))  # a copy we may rewrite
    for turn in turns:
        for part in turn.get("content", []) if isinstance(turn, dict) else []:
            if isinstance(part, dict) and part.get("type") in MEDIA_KINDS:
                part["member"] = member(str(part.get("member", "")))
                if isinstance(part.get("audio"), str):
                    part["audio"] = member(part["audio"])
    return RawSample(key, {"conversation": turns}, members)


SYNTH_STAMP = ".omni-synth.json"


def synthesize(out_dir: str | Path, num_samples: int, seed: int, val_every: int = 8) -> dict:
    """``omni-train data synth``: one energon dataset per synthetic category under
    ``out_dir/<category>`` (``num_samples`` each; every ``val_every``-th goes to ``val``).

    Deterministic for ``(num_samples, seed)``; a folder already made with the same arguments
    is kept as is (a stamp file records them), so setup scripts can call this every time.
    """
    from omni_train.data.synth_media import CATEGORIES, synth_samples

    if num_samples < 2:
        raise ValueError(f"--samples={num_samples}: need at least 2 (train and val)")
    out = Path(out_dir)
    args = {"samples": num_samples, "seed": seed, "val_every": val_every, "format": 2}
    stamp = out / SYNTH_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == args:
        log.info("%s already holds this synthetic dataset (%s)", out, args)
        return {c: num_samples for c in CATEGORIES}
    stamp.unlink(missing_ok=True)
    counts = {}
    for category in CATEGORIES:
        samples = [
            RawSample(s.key, s.conversation, s.members)
            for s in synth_samples(category, num_samples, seed)
        ]
        # every val_every-th sample, and at least one, goes to val
        in_val = {i for i in range(len(samples)) if i % val_every == val_every - 1}
        in_val = in_val or {len(samples) - 1}
        val = [s for i, s in enumerate(samples) if i in in_val]
        train = [s for i, s in enumerate(samples) if i not in in_val]
        write_dataset(out / category, train, val, samples_per_shard=max(1, len(train) // 4))
        counts[category] = len(samples)
        log.info("%s: %d train, %d val samples", out / category, len(train), len(val))
    stamp.write_text(json.dumps(args) + "\n")
    return counts


def read_raw(dataset_dir: str | Path, split: str = "train") -> Iterator[tuple[str, dict]]:
    """(key, {member: bytes}) of every sample in a dataset's ``split`` shards, in shard order
    and without energon: for inspection, tests and benchmarks."""
    for shard in sorted(Path(dataset_dir).glob(f"{split}-*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar.getmembers():
                key, _, member = info.name.partition(".")
                samples.setdefault(key, {})[member] = tar.extractfile(info).read()
        yield from samples.items()
