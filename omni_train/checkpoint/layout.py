"""Where a run's checkpoints live, and which one a run resumes from (pure pathlib: the launcher
reads it without megatron-core).

::

    <output_dir>/checkpoints/step_0000012/   one torch_dist checkpoint (+ its integrity record)
    <output_dir>/checkpoints/latest          name of the newest complete checkpoint (a hint)
    <output_dir>/checkpoints/damaged-step_0000016/   a damaged one, set aside by a resume

A checkpoint counts only once verified (:mod:`omni_train.checkpoint.integrity`). ``latest`` is
written after the record and read as a hint: when it is missing, unreadable or names a step that
is not there, the step folders themselves say which checkpoints exist, so a folder with
checkpoints never silently starts over.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from omni_train.checkpoint.integrity import NO_RECORD, has_record, verify

LATEST = "latest"
DAMAGED = "damaged-"
_STEP = re.compile(r"step_(\d{7,})")


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``step_*`` folder, newest (highest step) first."""
    found = []
    for p in checkpoints_dir(output_dir).glob("step_*"):
        m = _STEP.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def read_latest(output_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """(the step ``latest`` names, why it cannot be used): a missing ``latest`` is (None,
    None); garbage in it is (None, a reason)."""
    tracker = checkpoints_dir(output_dir) / LATEST
    try:
        text = tracker.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{tracker} is unreadable ({type(e).__name__})"
    if not _STEP.fullmatch(text):
        return None, f"{tracker} does not name a checkpoint ({text[:40]!r})"
    if not (checkpoints_dir(output_dir) / text).is_dir():
        return None, f"{tracker} names {text}, which does not exist"
    return text, None


@dataclass
class ResumePoint:
    """What :func:`resume_point` found: the checkpoint to resume from (None: none intact), the
    damaged ones newer than it (path, reason), and notes to log (a bad ``latest``, a save that
    did not finish, a checkpoint from before integrity records)."""

    path: Path | None = None
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _legacy_ok(path: Path) -> bool:
    """A checkpoint written before integrity records: complete if torch_dist finished it."""
    return (path / ".metadata").is_file() and (path / "metadata.json").is_file()


def resume_point(output_dir: str | os.PathLike) -> ResumePoint:
    """The newest intact checkpoint under ``output_dir``, and what was passed over.

    Newest first: a step with a record that verifies is taken; one with a record that does not
    is damaged; one without a record is a save that did not finish (passed over with a note),
    unless ``latest`` names it or no step has a record and torch_dist finished it (a checkpoint
    from before integrity records: taken, with a note)."""
    found = ResumePoint()
    named, problem = read_latest(output_dir)
    if problem:
        found.notes.append(problem)
    steps = step_dirs(output_dir)
    any_record = any(has_record(p) for p in steps)
    for path in steps:
        why = verify(path)
        if why is None:
            found.path = path
            return found
        if why == NO_RECORD:
            if (path.name == named or not any_record) and _legacy_ok(path):
                found.path = path
                found.notes.append(f"{path.name} has no integrity record (written before "
                                   "omni-train kept them): resumed unverified")  # fmt: skip
                return found
            found.notes.append(f"{path.name}: {NO_RECORD}; passed over")
            continue
        found.damaged.append((path, why))
    return found


def find_latest(output_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint under ``output_dir``, or None (see :func:`resume_point`)."""
    return resume_point(output_dir).path


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never deleted): ``damaged-step_N``."""
    target = path.with_name(f"{DAMAGED}{path.name}")
    n = 1
    while target.exists():
        target = path.with_name(f"{DAMAGED}{path.name}.{n}")
        n += 1
    path.rename(target)
    return target
