"""One run per output folder: an exclusive lock file, held for the whole run by the launcher
(``omni-train run``, which hands it to the ranks) or else by rank 0.

``<output_dir>/.omni-train.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local
filesystems and on NFS v3+, where a stage's shared output folder usually lives) and holds the
holder's host, pid, Slurm job and start time. A thread refreshes its modification time every
:data:`HEARTBEAT_S` seconds. A lock is stale when its holder is on this host and its process is
gone, or when its heartbeat is older than ``OMNI_TRAIN_LOCK_STALE_S`` (default
:data:`STALE_S`: a holder on another host cannot be probed); a stale lock is moved aside (one
rename: of two runs breaking it at once, one wins) and taken, with a warning. A live one stops
the new run before it reads or writes anything, naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from omni_train.log import get_logger

log = get_logger()

LOCK = ".omni-train.lock"
# The launcher (``omni-train run``) takes the lock before torchrun starts and passes its token to
# the ranks in this variable; rank 0 then adopts that lock instead of taking one.
TOKEN_ENV = "OMNI_TRAIN_LOCK_TOKEN"
HEARTBEAT_S = 30.0
STALE_S = 600.0


class LockedError(ValueError):
    """The output folder is in use by another run."""


def _stale_after() -> float:
    return float(os.environ.get("OMNI_TRAIN_LOCK_STALE_S", STALE_S))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def read_holder(output_dir: str | os.PathLike) -> tuple[dict, float] | None:
    """(the holder record, seconds since its last heartbeat), or None when unlocked."""
    path = Path(output_dir) / LOCK
    try:
        holder = json.loads(path.read_text() or "{}")
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        holder, age = {}, time.time() - path.stat().st_mtime  # being written, or damaged
    return holder, age


def stale_reason(holder: dict, age: float) -> str | None:
    """Why a lock no longer protects a live run, or None if it may."""
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
        return f"its process {holder.get('pid')} on this host is gone"
    if age > _stale_after():
        return f"its heartbeat is {age:.0f} s old (> OMNI_TRAIN_LOCK_STALE_S={_stale_after():.0f})"
    return None


def describe(holder: dict, age: float) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, started "
        f"{holder.get('started', '?')}, last heartbeat {age:.0f} s ago"
    )


def check_unlocked(output_dir: str | os.PathLike) -> None:
    """Raise :class:`LockedError` if a live run holds ``output_dir`` (the launcher's
    pre-flight; the run itself takes the lock with :class:`OutputLock`)."""
    found = read_holder(output_dir)
    if found is not None and stale_reason(*found) is None:
        raise LockedError(_busy(output_dir, *found))


def _busy(output_dir, holder: dict, age: float) -> str:
    return (
        f"checkpoint.output_dir={output_dir} is in use by another run ({describe(holder, age)});"
        " wait for it to finish or choose another checkpoint.output_dir. If that run is dead on"
        f" another host, its lock expires {_stale_after():.0f} s after its last heartbeat (or "
        f"delete {Path(output_dir) / LOCK})"
    )


def held_by_launcher(output_dir: str | os.PathLike) -> bool:
    """Whether the lock of ``output_dir`` is the one this process's launcher took for it."""
    token = os.environ.get(TOKEN_ENV)
    found = read_holder(output_dir)
    return bool(token) and found is not None and found[0].get("token") == token


class OutputLock:
    """The lock of one output folder: ``acquire()`` (raises :class:`LockedError`),
    ``release()``."""

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> OutputLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "token": self.token,
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = read_holder(self.dir)
                if found is None:
                    continue  # released in between
                why = stale_reason(*found)
                if why is None:
                    raise LockedError(_busy(self.dir, *found)) from None
                aside = self.path.with_name(f"{LOCK}.stale-{self.token}")
                try:
                    self.path.rename(aside)
                except FileNotFoundError:
                    continue  # another run broke it first; race for the new one
                log.warning(
                    "took over the stale lock of %s: %s (%s)", self.dir, why, describe(*found)
                )
                aside.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="omni-lock")
            self._thread.start()
            return self
        raise LockedError(f"could not take the lock {self.path} (contended); try again")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                log.error("the lock %s was removed while this run holds it", self.path)
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass
