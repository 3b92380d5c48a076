"""Micro-batches from megatron-energon: per data-parallel rank, resumable, with skip accounting.

Each rank builds an energon savable loader over the stage's metadataset (``data.blend``, with
its dataset variables resolved, or ``data.path``), sharded by data-parallel rank; tensor- and
context-parallel peers of a rank read the identical stream (energon is deterministic for a
given rank, world size and seed), as megatron's own energon examples do.

Checkpoints hold two parts (:meth:`EnergonBatches.state_dict` / :meth:`rank_state`): the
global totals (samples read, skipped per reason, tokens), identical on every rank, and each
rank's energon loader state, so a resumed stage continues at the same sample.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.energon import (
    WorkerConfig,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
    reraise_exception,
)

from omni_train.config import JobConfig, blends
from omni_train.data.chat import check_template
from omni_train.data.conversation import REASONS, NoUsableSampleError, SkipLimitError
from omni_train.data.layouts import layout_for
from omni_train.data.microbatch import MicroBatch, StepCounts, StopDuringWaitError
from omni_train.data.task_encoder import OmniBatch, OmniTaskEncoder
from omni_train.data.tokenizer import check_media_ids, load_tokenizer
from omni_train.log import get_logger

log = get_logger()


class DataTotals(TypedDict):
    """Global counts of a training stream since the stage began (identical on every rank):
    samples read (skipped ones included), samples and real tokens trained on, skipped samples
    per reason."""

    num_read: int
    num_samples: int
    num_tokens: int
    skipped: dict[str, int]


class EnergonState(DataTotals):
    """The global part of a training stream's checkpointed position: the totals and the worker
    count (energon restores a loader state only with the same count)."""

    num_workers: int


def metadataset_path(cfg: JobConfig) -> Path:
    """The energon dataset or metadataset this job reads (a blend is resolved and written
    under ``<output_dir>/data/``; identical content on every rank, written atomically)."""
    d = cfg.data
    if d.path is not None:
        return Path(d.path)
    paths = blends.job_paths(d.blend, d.paths, d.synthetic_root)
    out = Path(cfg.checkpoint.output_dir) / "data"
    return blends.write_metadataset(d.blend, paths, out, d.blend_temperature)


def pad_multiples(cfg: JobConfig) -> tuple[int, int]:
    """(per sample, per micro-batch) token multiples megatron-core needs: context parallel's
    load-balanced split cuts every packed sample (or an unpacked micro-batch's whole sequence)
    into 2 x cp chunks, x tp under sequence parallel; sequence parallel splits the sequence over
    tp ranks. ``data.packing.sample_pad_multiple`` overrides the per-sample multiple
    (validation checks it is compatible)."""
    p = cfg.parallel
    tp_sp = p.tp if p.sp else 1
    cp_multiple = 2 * p.cp * tp_sp if p.cp > 1 else 1
    if cfg.data.packing.enabled:
        explicit = cfg.data.packing.sample_pad_multiple
        return (cp_multiple if explicit is None else explicit), tp_sp
    return 1, max(cp_multiple, tp_sp)


def global_packing(cfg: JobConfig, training: bool) -> bool:
    pk = cfg.data.packing
    return training and pk.enabled and pk.balance == "global"


def task_encoder(
    cfg: JobConfig, *, training: bool, dp_size: int = 1, dp_rank: int = 0
) -> OmniTaskEncoder:
    """The encoder of this rank's stream. Training with global packing: bins are dealt over
    the ``dp_size`` ranks; evaluation packs each rank's own stream (its balance is moot)."""
    pk = cfg.data.packing
    dealt = global_packing(cfg, training)
    per_sample, per_batch = pad_multiples(cfg)
    return OmniTaskEncoder(
        tokenizer=cfg.data.tokenizer,
        vision=cfg.model.vision,
        audio=cfg.model.audio,
        context_length=cfg.trainer.seq_length,
        layout=layout_for(cfg.data.layout),
        pad_multiple=per_batch,
        video_fps=cfg.data.video_fps,
        max_video_frames=cfg.data.max_video_frames,
        training=training,
        seed=cfg.trainer.seed,
        over_long=cfg.data.over_long,
        packing=pk if pk.enabled else None,
        num_ranks=dp_size if dealt else 1,
        rank=dp_rank if dealt else 0,
        sample_pad_multiple=per_sample if pk.enabled else 1,
        count_reads=dp_rank == 0 or not dealt,
        # training only: the skip guard's bound when no step completes (data.max_skip_fraction
        # = 1 switches the guard off)
        max_consecutive_skips=(
            max(cfg.data.skip_check_min_samples, 1)
            if training and cfg.data.max_skip_fraction < 1.0
            else None
        ),
    )


def to_device(batch: OmniBatch, device: torch.device) -> MicroBatch:
    """What the forward step reads (``packed_seq_params`` for a packed micro-batch)."""
    packed = None
    if batch.cu_seqlens is not None:
        packed = packed_seq_params(batch.cu_seqlens.to(device), batch.cu_seqlens_padded.to(device))
    move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
    return MicroBatch(
        tokens=move(batch.tokens),
        labels=move(batch.labels),
        loss_mask=move(batch.loss_mask),
        position_ids=move(batch.position_ids),
        media=batch.media.to(device),
        packed_seq_params=packed,
        categories=list(batch.categories),
    )


def packed_seq_params(cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor):
    """megatron-core's THD description of one packed sequence (int32 boundaries [n+1])."""
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int((cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens_padded,
        cu_seqlens_kv_padded=cu_seqlens_padded,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def sum_over_ranks(counts: Counter, keys: list[str], group, device) -> dict[str, int]:
    """``counts[k]`` for every key, summed over the ranks of ``group`` (collective)."""
    values = torch.tensor([counts[k] for k in keys], dtype=torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        values = values.to(device)
        dist.all_reduce(values, group=group)
    return dict(zip(keys, (int(c) for c in values.tolist()), strict=True))


def _isolated(fn, *args):
    """``fn(*args)`` without touching the training RNG. Data loading must not consume the
    global generator that the model's random ops (the CPE's random crop, the mel dither) draw
    from: torch's DataLoader draws a worker seed when an iterator starts (at step k in a
    resumed run, at step 0 in an uninterrupted one), and energon running in the main process
    (``num_workers=0``) restores and iterates differently after a resume."""
    with torch.random.fork_rng(devices=[]):
        return fn(*args)


class EnergonBatches:
    """Training micro-batches of one data-parallel rank, a
    :class:`~omni_train.data.microbatch.TrainStream`."""

    def __init__(
        self,
        cfg: JobConfig,
        *,
        dp_size: int,
        dp_rank: int,
        dp_group,
        device: torch.device,
        stop_requested=None,
    ):
        """``stop_requested``: returns a reason once a stop is asked for (a signal), which ends
        a wait for the next micro-batch (:meth:`_wait`)."""
        t, d = cfg.trainer, cfg.data
        self.cfg = cfg
        self.device = device
        self.dp_group = dp_group
        self.num_microbatches = t.global_batch_size // dp_size // t.micro_batch_size
        self.path = metadataset_path(cfg)
        dealt = global_packing(cfg, training=True)
        worker_config = WorkerConfig(
            # global packing: every rank reads the whole stream, the packer deals the bins
            rank=0 if dealt else dp_rank,
            world_size=1 if dealt else dp_size,
            num_workers=d.num_workers,
            seed_offset=t.seed,
            global_error_handler=reraise_exception,  # our bad samples are SkipSample; bugs raise
        )
        dataset = get_train_dataset(
            self.path,
            split_part="train",
            worker_config=worker_config,
            batch_size=t.micro_batch_size,
            shuffle_buffer_size=d.shuffle_buffer_size or None,
            max_samples_per_sequence=d.max_samples_per_sequence or None,
            task_encoder=task_encoder(cfg, training=True, dp_size=dp_size, dp_rank=dp_rank),
        )
        self.loader = get_savable_loader(dataset)
        self.stop_requested = stop_requested
        self._fetcher = None
        self._iter = None
        self.last_keys: list[str] = []
        self.totals = DataTotals(num_read=0, num_samples=0, num_tokens=0, skipped={})
        self._step = Counter()  # this rank, since the last end_step

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        if self._iter is None:
            self._iter = _isolated(iter, self.loader)
        try:
            batch: OmniBatch = self._wait(lambda: _isolated(next, self._iter))
        except NoUsableSampleError as e:  # from a worker: its message, not the worker's trace
            raise NoUsableSampleError(_worker_message(e)) from None
        self.last_keys = list(batch.keys)  # named in the error if this micro-batch fails
        self._step["num_positions"] += batch.tokens.numel()
        self._step["num_read"] += batch.num_read
        self._step["num_samples"] += len(batch.keys)
        self._step["num_tokens"] += batch.num_real_tokens
        for reason, n in batch.skipped.items():
            self._step["skip:" + reason] += n
        return to_device(batch, self.device)

    def _wait(self, fetch):
        """``fetch()``, from a helper thread while this one polls ``stop_requested``: a stop
        ends the wait with :class:`StopDuringWaitError` (the fetch is abandoned: the process is
        about to exit). A signal handler cannot do this itself: raised at an arbitrary point
        (inside the loader's or logging's locks) its exception can be swallowed or leave a lock
        held."""
        if self.stop_requested is None:
            return fetch()
        if self._fetcher is None:
            self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="omni-data")
        pending = self._fetcher.submit(fetch)
        while True:
            try:
                return pending.result(timeout=0.2)
            except FutureTimeout:
                reason = self.stop_requested()
                if reason is not None:
                    raise StopDuringWaitError(reason) from None

    def end_step(self) -> StepCounts:
        """Add this step's counts of all data-parallel ranks to the totals; raise
        :class:`SkipLimitError` when the skipped share passes ``data.max_skip_fraction``.
        Returns the step's ``samples``, real ``tokens``, ``positions`` (tokens with padding)
        and ``skipped`` per reason when any. Collective over the data-parallel group."""
        keys = ["num_read", "num_samples", "num_tokens", "num_positions"]
        keys += ["skip:" + r for r in REASONS]
        step = sum_over_ranks(self._step, keys, self.dp_group, self.device)
        self._step = Counter()
        for k in ("num_read", "num_samples", "num_tokens"):
            self.totals[k] += step[k]
        skipped = Counter(self.totals["skipped"])
        for r in REASONS:
            skipped[r] += step["skip:" + r]
        self.totals["skipped"] = {r: n for r, n in sorted(skipped.items()) if n}
        self._check_skips()
        new = {r: step["skip:" + r] for r in REASONS if step["skip:" + r]}
        report = StepCounts(
            samples=step["num_samples"], tokens=step["num_tokens"], positions=step["num_positions"]
        )
        if new:
            report["skipped"] = new
        return report

    def _check_skips(self) -> None:
        d = self.cfg.data
        read, skipped = self.totals["num_read"], sum(self.totals["skipped"].values())
        if read >= max(d.skip_check_min_samples, 1) and skipped > d.max_skip_fraction * read:
            raise SkipLimitError(
                f"{skipped} of {read} samples read were skipped ({skipped / read:.1%}), more "
                f"than data.max_skip_fraction={d.max_skip_fraction}: "
                f"{self.totals['skipped']}. Fix the data (the log names every skipped "
                "sample), or raise data.max_skip_fraction"
            )

    def state_dict(self) -> EnergonState:
        """Global totals (identical on every rank)."""
        return {"num_workers": self.cfg.data.num_workers, **self.totals}

    def rank_state(self) -> bytes:
        """This rank's energon loader state (taken between optimizer steps)."""
        return pickle.dumps(self.loader.save_state_rank())

    def load_state_dict(self, state: Mapping[str, Any], rank_state: bytes | None) -> None:
        if state.get("num_workers") != self.cfg.data.num_workers or rank_state is None:
            raise ValueError(
                f"the checkpoint's data position was saved with data.num_workers="
                f"{state.get('num_workers')} and this run has {self.cfg.data.num_workers}; "
                "energon resumes only with the same worker count: set it back"
            )
        self.totals = DataTotals(
            num_read=state["num_read"],
            num_samples=state["num_samples"],
            num_tokens=state["num_tokens"],
            skipped=state["skipped"],
        )
        _isolated(self.loader.restore_state_rank, pickle.loads(rank_state))
        self._iter = None


class EnergonEvalBatches:
    """Held-out micro-batches, an :class:`~omni_train.data.microbatch.EvalStream`: the split
    ``data.eval_split``, in order, without workers; every evaluation starts from its beginning
    and wraps around when it runs out."""

    def __init__(self, cfg: JobConfig, path: Path, *, dp_size: int, dp_rank: int, dp_group, device):
        """``path``: the metadataset the training stream resolved (written once)."""
        self.device = device
        self.dp_group = dp_group
        self._skipped: Counter[str] = Counter()
        self.last_keys: list[str] = []
        self._make = lambda: get_loader(
            get_val_dataset(
                path,
                split_part=cfg.data.eval_split,
                worker_config=WorkerConfig(
                    rank=dp_rank,
                    world_size=dp_size,
                    num_workers=0,
                    global_error_handler=reraise_exception,
                ),
                batch_size=cfg.trainer.micro_batch_size,
                task_encoder=task_encoder(cfg, training=False),
            )
        )
        self.restart()

    def restart(self) -> None:
        self._iter = _isolated(lambda: iter(self._make()))

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        try:
            batch: OmniBatch = _isolated(next, self._iter)
        except StopIteration:
            self.restart()
            batch = _isolated(next, self._iter)
        self.last_keys = list(batch.keys)
        self._skipped.update(batch.skipped)
        return to_device(batch, self.device)

    def take_skipped(self) -> dict[str, int]:
        """Samples skipped per reason (all data-parallel ranks) since the last call: the last
        evaluation's (collective over the data-parallel group)."""
        totals = sum_over_ranks(self._skipped, list(REASONS), self.dp_group, self.device)
        self._skipped = Counter()
        return {r: n for r, n in totals.items() if n}


def _worker_message(e: BaseException) -> str:
    """The original message of an error torch's DataLoader re-raised from a worker (it wraps
    it as "Caught X in DataLoader worker process N. Original Traceback ...")."""
    lines = str(e).strip().splitlines()
    for line in reversed(lines):
        name, sep, rest = line.partition(f"{type(e).__name__}: ")
        if sep and not name.strip(" .").count(" "):
            return rest.strip()
    return lines[0] if lines else repr(e)


def build_energon_data(
    cfg: JobConfig, ps, device: torch.device, stop_requested=None
) -> tuple[EnergonBatches, EnergonEvalBatches | None]:
    """(train, eval) streams for this rank (eval None when ``trainer.eval_iters=0``); checks
    the tokenizer against the model first."""
    tok = load_tokenizer(cfg.data.tokenizer)
    check_media_ids(tok, cfg.model.media_tokens, cfg.model.vocab_size)
    check_template(tok, layout_for(cfg.data.layout))
    train = EnergonBatches(
        cfg,
        dp_size=ps.dp,
        dp_rank=ps.dp_rank,
        dp_group=mpu.get_data_parallel_group(),
        device=device,
        stop_requested=stop_requested,
    )
    evals = None  # no held-out split is read when the stage does not evaluate
    if cfg.trainer.eval_iters > 0:
        evals = EnergonEvalBatches(
            cfg,
            train.path,
            dp_size=ps.dp,
            dp_rank=ps.dp_rank,
            dp_group=mpu.get_data_parallel_group(),
            device=device,
        )
    return train, evals
