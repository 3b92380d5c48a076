"""A checkpoint is trusted only when verified: an integrity record written at save, checked
before a resume (pure pathlib and hashlib: the launcher runs it without megatron-core).

``<checkpoint>/omni_train_integrity.json`` lists every file of the checkpoint with its size and
a SHA-256 digest, and is written last, after every rank finished writing: a save that crashed
has none. The digest covers the whole file (``checkpoint.integrity=full``) or its first and last
:data:`HEAD_TAIL` bytes with the size (``head_tail``, the default). Each rank digests the files
it wrote (torch_dist names them ``__<rank>_<n>.distcp``), so a save costs each rank its own
share; a check from one process reads every file's head and tail, or everything under ``full``
(``benchmarks/checkpoint_integrity.py`` measures both).

What ``head_tail`` catches: a missing, truncated, extended or emptied file, and damage to the
start or end of one; not a flipped byte in the middle of a large file (``full`` does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

RECORD = "omni_train_integrity.json"
HEAD_TAIL = 256 * 1024
MODES = ("head_tail", "full")
_WRITER = re.compile(r"__(\d+)_\d+\.distcp$")


def digest(path: Path, mode: str) -> str:
    """SHA-256 of the whole file (``full``) or of its size, head and tail (``head_tail``)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if mode == "full" or size <= 2 * HEAD_TAIL:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        else:
            h.update(f.read(HEAD_TAIL))
            f.seek(size - HEAD_TAIL)
            h.update(f.read(HEAD_TAIL))
    return h.hexdigest()


def files_of(ckpt: Path) -> list[str]:
    """Every file under ``ckpt`` (relative paths, sorted), the record itself left out."""
    return sorted(
        str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != RECORD
    )


def writer_rank(name: str) -> int:
    """The rank that wrote (and digests) a file: torch_dist's ``__<rank>_<n>.distcp``; rank 0
    for the rest (metadata, common state)."""
    m = _WRITER.search(name)
    return int(m.group(1)) if m else 0


def digest_files(ckpt: Path, names: list[str], mode: str) -> dict[str, dict]:
    return {n: {"size": (ckpt / n).stat().st_size, "sha256": digest(ckpt / n, mode)} for n in names}


def write_record(
    ckpt: Path, files: dict[str, dict], mode: str, payload: int = 0, entries: int = 0
) -> dict:
    """Write the record (atomically) once every file is digested; returns it. ``payload``: the
    tensor and object bytes the save counted before writing (omni_train.checkpoint.io)."""
    record = {
        "format": 1,
        "mode": mode,
        "payload_bytes": payload,
        "payload_entries": entries,
        "head_tail_bytes": HEAD_TAIL,
        "bytes": sum(f["size"] for f in files.values()),
        "files": files,
    }
    tmp = ckpt / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, ckpt / RECORD)
    return record


def has_record(ckpt: Path) -> bool:
    return (ckpt / RECORD).is_file()


def read_record(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / RECORD).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {"format": None}


NO_RECORD = "no integrity record (a save that did not finish)"


def verify(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be trusted, or None when every recorded file is there with its
    recorded size and digest."""
    record = read_record(ckpt)
    if record is None:
        return NO_RECORD
    if record.get("format") != 1 or record.get("mode") not in MODES:
        return f"its {RECORD} is unreadable"
    if record.get("head_tail_bytes", HEAD_TAIL) != HEAD_TAIL:
        return f"its {RECORD} was written with another head/tail size"
    for name, want in sorted(record["files"].items()):
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} is {size:,} bytes, {want['size']:,} when saved"
        if digest(path, record["mode"]) != want["sha256"]:
            return f"{name} differs from what was saved (SHA-256, {record['mode']})"
    return None


def checkpoint_bytes(ckpt: Path) -> int | None:
    """What a checkpoint occupies, from its record (None without one)."""
    record = read_record(ckpt)
    return record.get("bytes") if record else None


def fingerprint(ckpt: Path) -> str:
    """SHA-256 over every file's name, size and head/tail digest: what an adapter checkpoint
    records of its base (:mod:`omni_train.checkpoint.peft`), to refuse a base that changed.
    Read from a ``head_tail`` record when there is one (the same value, no reading)."""
    record = read_record(ckpt)
    if record and record.get("mode") == "head_tail" and record.get("files"):
        files = record["files"]
    else:
        files = digest_files(ckpt, files_of(ckpt), "head_tail")
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]['size']}\0{files[name]['sha256']}\n".encode())
    return h.hexdigest()[:32]
