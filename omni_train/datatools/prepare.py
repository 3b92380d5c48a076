"""Write energon-ready datasets: webdataset tar shards, then ``energon prepare``.

A sample is ``<key>.json`` (the conversation) plus ``<key>.<member>`` per media member, in one
tar. Shards are byte-deterministic (sorted keys, fixed tar metadata), so the same input makes
the same dataset. Train and validation samples go to separate shards (``train-*.tar``,
``val-*.tar``) and energon's own CLI indexes them with explicit split parts, so no split depends
on a ratio over a handful of shards.

:mod:`omni_train.datatools.convert` turns the formats users already have into such a dataset,
streaming: :class:`DatasetWriter` takes one sample at a time.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from omni_train.datatools.learn_tasks import MEDIA_MODES, TASKS, task_samples
from omni_train.datatools.synth_media import CATEGORIES, synth_samples
from omni_train.log import get_logger

log = get_logger()

KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset splits a name at its first dot: no dots
EXTENSIONS = ("png", "jpg", "jpeg", "gif", "webp", "mp4", "webm", "mkv", "wav", "flac", "mp3")
EXTENSIONS += ("ogg", "m4a")
MEMBER = re.compile(rf"^[a-z0-9_]+\.({'|'.join(EXTENSIONS)})$")
# Marks a folder this module wrote: only such a folder may be replaced (and only when asked).
STAMP = ".omni-train-dataset.json"


@dataclass(frozen=True)
class RawSample:
    key: str
    conversation: dict
    members: dict[str, bytes]  # member name (e.g. "img0.png") -> bytes

    def tar_members(self) -> dict[str, bytes]:
        """Every member as a shard stores it: ``json`` (the conversation), then the media
        members in name order (what ``cook_raw`` and energon read back)."""
        conversation = json.dumps(self.conversation, sort_keys=True).encode()
        return {"json": conversation, **{m: self.members[m] for m in sorted(self.members)}}


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


class ShardWriter:
    """``<prefix>-NNNNNN.tar`` shards of ``samples_per_shard`` samples, written as samples
    arrive (one open tar at a time: memory holds one sample, not a dataset)."""

    def __init__(self, out_dir: Path, prefix: str, samples_per_shard: int):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.prefix, self.size = out_dir, prefix, samples_per_shard
        self.names: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def add(self, s: RawSample) -> None:
        if not KEY.match(s.key):
            raise ValueError(f"sample key {s.key!r}: use letters, digits, '_' or '-'")
        bad = [m for m in s.members if not MEMBER.match(m)]
        if bad:
            raise ValueError(f"sample {s.key}: member names {bad} must match {MEMBER.pattern}")
        if self._tar is None:
            self.names.append(f"{self.prefix}-{len(self.names):06d}.tar")
            path = self.out_dir / self.names[-1]
            # kept open across add() calls, closed by flush(): a context manager cannot span them
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        for member, data in s.tar_members().items():
            _add(self._tar, f"{s.key}.{member}", data)
        self._count += 1
        if self._count == self.size:
            self.flush()

    def flush(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._count = None, 0

    def close(self) -> list[str]:
        self.flush()
        return self.names


def write_shards(
    samples: Iterable[RawSample], out_dir: Path, prefix: str, samples_per_shard: int
) -> list[str]:
    """Write ``<prefix>-NNNNNN.tar`` shards; returns their names."""
    writer = ShardWriter(out_dir, prefix, samples_per_shard)
    for s in samples:
        writer.add(s)
    return writer.close()


def energon_prepare(out_dir: Path, splits: list[str]) -> None:
    """Index the shards with megatron-energon's ``energon prepare`` (its real CLI).

    Energon indexes with worker processes that it always *forks*, and waits for them with no
    timeout. Forked from a process with live threads (a loader's, pytest-xdist's, a profiler's)
    a worker can inherit a lock held by a thread that does not exist in it and block forever:
    a CI run hung here for 15 minutes. So the CLI runs in a child forked, per dataset, from a
    single-threaded helper process that has imported energon once (a fresh interpreter per
    dataset would pay that import, ~4 s, every time); unlike multiprocessing's forkserver the
    helper never re-imports the caller's ``__main__``, so unguarded user scripts still work."""
    with _helper_lock:
        helper = _index_helper()
        try:
            helper.stdin.write(json.dumps({"out_dir": str(out_dir), "splits": splits}) + "\n")
            helper.stdin.flush()
            reply = helper.stdout.readline()
        except BrokenPipeError:
            reply = ""
        if not reply:
            raise RuntimeError(
                f"energon prepare {out_dir}: the indexing helper process exited "
                f"(code {helper.wait()}); its stderr above says why"
            )
    if error := json.loads(reply)["error"]:
        raise RuntimeError(error)


_helper: tuple[int, subprocess.Popen] | None = None  # (the pid that started it, the helper)
_helper_lock = threading.Lock()


def _index_helper() -> subprocess.Popen:
    """The running helper (see :func:`energon_prepare`), started by this process if need be:
    a forked child of ours must not talk over its parent's pipes."""
    global _helper
    if _helper is None or _helper[0] != os.getpid() or _helper[1].poll() is not None:
        path = [p for p in sys.path if isinstance(p, str)]
        code = f"import sys; sys.path[:0] = {path!r}; import {__name__} as m; m._index_server()"
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        _helper = (os.getpid(), proc)
        atexit.register(_stop_helper, proc)
    return _helper[1]


def _stop_helper(proc: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        proc.stdin.close()  # the helper's loop ends at EOF
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _index_server() -> None:
    """The helper's loop: one JSON request per stdin line, one reply per line, each request
    run in a child forked from this single-threaded process."""
    import megatron.energon.cli.main  # noqa: F401  (imported once; every child inherits it)

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints must not reach the reply stream
    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                _energon_cli_prepare(request["out_dir"], request["splits"])
                error = b""
            except BaseException as e:  # the child reports everything, then exits
                error = (str(e) or repr(e)).encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(error)
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as got:
            error = got.read().decode()
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code and not error:
            error = f"energon prepare {request['out_dir']}: its process ended with code {code}"
        replies.write(json.dumps({"error": error or None}) + "\n")
        replies.flush()


def _energon_cli_prepare(out_dir: str, splits: list[str]) -> None:
    from megatron.energon.cli.main import main as energon_cli

    num_shards = len(list(Path(out_dir).glob("*.tar")))
    workers = max(1, min(16, num_shards, os.cpu_count() or 1))  # energon's default is 16
    args = ["prepare", out_dir, "--non-interactive", "--force-overwrite", "--no-progress"]
    args += ["--sample-type", "CrudeWebdataset", "--num-workers", str(workers)]
    for split in splits:
        # a regex over shard paths; a split without shards stays empty
        args += ["--split-parts", f"{split}:{split}-[0-9]+\\.tar"]
    said = io.StringIO()  # energon prints its findings; keep them for an error message
    try:
        with contextlib.redirect_stdout(said):
            energon_cli(args, standalone_mode=False)
    except (Exception, SystemExit) as e:  # click exits; energon raises on bad shards
        raise RuntimeError(f"energon prepare {out_dir} failed: {e}\n{said.getvalue()}") from e


def _write_into(
    out: Path, train: Iterable[RawSample], val: Iterable[RawSample], samples_per_shard: int
) -> None:
    splits = {
        "train": write_shards(train, out, "train", samples_per_shard),
        "val": write_shards(val, out, "val", samples_per_shard),
    }
    if not splits["train"]:
        raise ValueError(f"{out}: no training samples")
    energon_prepare(out, list(splits))


def is_omni_train_output(folder: Path) -> bool:
    return (folder / STAMP).is_file() or (folder / SYNTH_STAMP).is_file()


def check_target(out: Path, *, overwrite: bool, protect: Iterable[Path] = ()) -> None:
    """Refuse to write where data would be lost: an existing folder that omni-train did not
    write (whatever ``overwrite`` says), one it wrote unless ``overwrite``, and any folder that
    is, holds or lies inside a protected one (the ``--media`` input)."""
    resolved = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if resolved == p or p.is_relative_to(resolved) or resolved.is_relative_to(p):
            raise ValueError(f"--out {out} overlaps the input folder {p}; choose another --out")
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return
    if not is_omni_train_output(out):
        raise ValueError(
            f"--out {out} exists and is not an omni-train dataset (no {STAMP}); nothing is "
            "deleted: choose another --out"
        )
    if not overwrite:
        raise ValueError(
            f"--out {out} already holds an omni-train dataset; pass --overwrite to replace it"
        )


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` into place (an existing ``out`` was checked by
    :func:`check_target`): renames only, so a reader never sees a half-written dataset."""
    if out.exists():
        trash = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def _staging(out: Path):
    """A sibling folder to write into; removed if the writing fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.writing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class DatasetWriter:
    """A complete energon dataset in ``out_dir``, fed one sample at a time, written beside it
    and renamed into place on success (see :func:`check_target` for what may be replaced)::

        with DatasetWriter(out, 1000, overwrite=False) as w:
            w.add(sample, val=False)
    """

    def __init__(
        self,
        out_dir: str | Path,
        samples_per_shard: int = 100,
        *,
        overwrite: bool = False,
        protect: Iterable[Path] = (),
    ):
        self.out = Path(out_dir)
        check_target(self.out, overwrite=overwrite, protect=protect)
        self.samples_per_shard = samples_per_shard

    def __enter__(self) -> DatasetWriter:
        self._staging = _staging(self.out)
        self.tmp = self._staging.__enter__()
        with _helper_lock:
            _index_helper()  # it imports energon while the shards are written
        self.splits = {
            split: ShardWriter(self.tmp, split, self.samples_per_shard)
            for split in ("train", "val")
        }
        return self

    def add(self, sample: RawSample, val: bool = False) -> None:
        self.splits["val" if val else "train"].add(sample)

    def __exit__(self, kind, error, tb) -> None:
        names = {split: w.close() for split, w in self.splits.items()}
        if kind is None:
            try:
                if not names["train"]:
                    raise ValueError(f"{self.out}: no training samples")
                energon_prepare(self.tmp, list(names))
                (self.tmp / STAMP).write_text(json.dumps({"format": 1}) + "\n")
            except BaseException as e:
                self._staging.__exit__(type(e), e, e.__traceback__)
                raise
        if self._staging.__exit__(kind, error, tb):
            return
        if kind is None:
            if self.out.exists() and not any(self.out.iterdir()):
                self.out.rmdir()
            _replace(self.tmp, self.out)


def write_dataset(
    out_dir: str | Path,
    train: Iterable[RawSample],
    val: Iterable[RawSample],
    samples_per_shard: int = 100,
    *,
    overwrite: bool = False,
    protect: Iterable[Path] = (),
) -> Path:
    """A complete energon dataset in ``out_dir`` from two iterables (:class:`DatasetWriter`)."""
    with DatasetWriter(out_dir, samples_per_shard, overwrite=overwrite, protect=protect) as w:
        for s in train:
            w.add(s)
        for s in val:
            w.add(s, val=True)
    return Path(out_dir)


def is_val(key: str, val_fraction: float) -> bool:
    """Deterministic split by key: the same sample lands in the same split every time."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < val_fraction


SYNTH_STAMP = ".omni-synth.json"


FLAVOURS = ("general", "learn")
# samples per category (general) or per task (learn) when a curriculum makes the data itself
DEFAULT_SAMPLES = {"general": 64, "learn": 1000}
LEARN_METADATASET = "learn.yaml"


def synthesize(
    out_dir: str | Path,
    num_samples: int,
    seed: int,
    val_every: int = 8,
    *,
    overwrite=False,
    flavour: str = "general",
    media: str = "real",
    tasks: Iterable[str] | None = None,
) -> dict:
    """``omni-train data synth``: one energon dataset per synthetic category under
    ``out_dir/<category>`` (``num_samples`` each; every ``val_every``-th goes to ``val``).

    ``flavour="learn"``: the image, document, video, audio and audio_video folders hold the
    learnability tasks instead (:mod:`omni_train.datatools.learn_tasks`: ``num_samples`` train
    samples per task, and a class-balanced val split of ``num_samples // val_every`` rounded up
    to a multiple of 12 per task), with their ``media`` real, noise or none; text and
    multi_image stay general. ``out_dir/learn.yaml`` is then an energon metadataset over the
    task folders, each task equally likely. ``tasks``: only these tasks' folders (a quick run).

    Deterministic for its arguments; a folder already made with the same arguments is kept as
    is (a stamp file records them), so setup scripts can call this every time. Other arguments
    replace it only with ``overwrite`` (see :func:`check_target`); the new folder is written
    beside it and renamed into place.
    """
    if num_samples < 2:
        raise ValueError(f"--samples={num_samples}: need at least 2 (train and val)")
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r}; valid: {', '.join(FLAVOURS)}")
    if media not in MEDIA_MODES or (flavour == "general" and media != "real"):
        raise ValueError(f"media={media!r}: valid for the learn flavour: {', '.join(MEDIA_MODES)}")
    chosen = list(TASKS) if tasks is None else list(tasks)
    if unknown := sorted(set(chosen) - set(TASKS)):
        raise ValueError(f"unknown learnability task(s) {unknown}; valid: {', '.join(TASKS)}")
    if tasks is not None and flavour != "learn":
        raise ValueError("tasks are chosen for flavour=learn only")
    out = Path(out_dir)
    # format: bump when a generator changes its bytes (3: the pitch task's C is C8, not C3)
    args = {"samples": num_samples, "seed": seed, "val_every": val_every, "format": 3}
    if flavour != "general":
        args |= {"flavour": flavour, "media": media, "tasks": chosen}
    stamp = out / SYNTH_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == args:
        log.info("%s already holds this synthetic dataset (%s)", out, args)
        return {c: num_samples for c in CATEGORIES}
    check_target(out, overwrite=overwrite)
    counts = {}
    with _staging(out) as tmp:
        weights = {}
        for category in CATEGORIES:
            held = [t for t in chosen if TASKS[t].category == category]
            if flavour == "learn" and held:
                train, val = _task_splits(held, num_samples, seed, val_every, media)
                weights[category] = len(held)  # every task equally likely
            elif tasks is not None:
                continue
            else:
                train, val = _general_splits(category, num_samples, seed, val_every)
            (tmp / category).mkdir()
            _write_into(tmp / category, train, val, max(1, len(train) // 4))
            (tmp / category / STAMP).write_text(json.dumps({"format": 1}) + "\n")
            counts[category] = len(train) + len(val)
            log.info("%s: %d train, %d val samples", out / category, len(train), len(val))
        if weights:
            _write_learn_metadataset(tmp / LEARN_METADATASET, weights)
        (tmp / SYNTH_STAMP).write_text(json.dumps(args) + "\n")
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    _replace(tmp, out)
    return counts


def _raw(samples) -> list[RawSample]:
    """Generated samples (``SynthSample``: key, conversation, members) as the writer takes them."""
    return [RawSample(s.key, s.conversation, s.members) for s in samples]


def _general_splits(category: str, num_samples: int, seed: int, val_every: int):
    samples = _raw(synth_samples(category, num_samples, seed))
    # every val_every-th sample, and at least one, goes to val
    in_val = {i for i in range(len(samples)) if i % val_every == val_every - 1}
    in_val = in_val or {len(samples) - 1}
    val = [s for i, s in enumerate(samples) if i in in_val]
    train = [s for i, s in enumerate(samples) if i not in in_val]
    return train, val


def learn_val_size(num_samples: int, val_every: int) -> int:
    """Val samples per task: a multiple of 12, so every task's classes (2, 3, 4 or 6 of
    them) are equally many and the answer prior is worth exactly 1 / classes."""
    return 12 * max(1, -(-(num_samples // val_every) // 12))


def _task_splits(tasks: list[str], num_samples: int, seed: int, val_every: int, media: str):
    """Train: samples 0..n-1 of each task, interleaved; val: the next ones (unseen media)."""
    num_val = learn_val_size(num_samples, val_every)
    train = [_raw(task_samples(t, num_samples, seed, media=media)) for t in tasks]
    val = [_raw(task_samples(t, num_val, seed, media=media, start=num_samples)) for t in tasks]
    interleave = lambda lists: [s for group in zip(*lists, strict=True) for s in group]  # noqa: E731
    return interleave(train), interleave(val)


def _write_learn_metadataset(path: Path, weights: dict[str, int]) -> None:
    """An energon MetadatasetV2 over the task folders (paths relative to the file)."""
    import yaml

    def blend() -> dict:  # a new object per split: no YAML anchors
        return {"blend": [{"weight": w, "path": c, "subflavors": {"category": c}}
                          for c, w in weights.items()]}  # fmt: skip

    doc = {"__module__": "megatron.energon", "__class__": "MetadatasetV2"}
    doc["splits"] = {"train": blend(), "val": blend()}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


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


def task_items(root: str | Path) -> dict[str, list[tuple[str, dict, str, str]]]:
    """{task: [(key, members, category, answer), ...]} of the val split under ``root``, tasks
    in :data:`~omni_train.datatools.learn_tasks.TASKS` order; empty when ``root`` holds none."""
    found: dict[str, list] = {name: [] for name in TASKS}
    for category in sorted({t.category for t in TASKS.values()}):
        folder = Path(root) / category
        if not folder.is_dir():
            continue
        for key, members in read_raw(folder, "val"):
            doc = json.loads(members["json"])
            if doc.get("task") in found:
                found[doc["task"]].append((key, members, category, doc["answer"]))
    return {name: items for name, items in found.items() if items}
