"""The online packer inside energon: planned samples in, THD packed sequences out.

:class:`OnlinePackingDataset` wraps the stream of *planned* samples (laid out from media
metadata, nothing decoded) in each data worker. It feeds their packed lengths and costs to
:class:`~omni_train.data.packing.OnlinePacker`, and for every round it fetches the samples of
this rank's bin, decodes them (the task encoder's ``postencode_sample``) and concatenates them
(``pack_selected_samples``). The packer's buffer holds only restore keys, lengths and costs, so
it can be large (a global buffer must hold many rounds of ``data-parallel size`` bins). The
planned samples themselves (media still encoded) wait beside it in a :class:`PlanCache` of
``packing.plan_cache_mib``; a sample that did not fit, or one of a buffer a resumed stage
restored, is read and planned again by its energon restore key (the same sample, planned the
same way: the plan is a function of the sample). On the learnability data the cache cut the
pipeline's CPU time per sample 1.5x (``benchmarks/plan_cache.py``).

Global balance: with ``num_ranks`` > 1 every data-parallel rank's worker ``w`` reads the
identical stream (energon configured as a single rank), runs the identical packer, and keeps
bin ``rank`` of each round; the other bins' samples are decoded and trained on by the other
ranks. Each sample is trained on once across the job; every rank reads and plans every sample.

Checkpoints: the packer state and the restore keys are this wrapper's energon state
(``_savable_fields``), saved with the loader's per-rank state; a resumed stage continues in the
middle of a buffer exactly where it left off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from megatron.energon import SkipSample
from megatron.energon.flavors.base_dataset import set_sample_restore_key
from megatron.energon.worker import WorkerConfig
from megatron.energon.wrappers.base import BaseWrapperDataset, SampleIndex, get_sample_restore_key

from omni_train.data.packing import OnlinePacker


class PlanCache:
    """Planned samples by packer id, up to ``capacity`` bytes of their (encoded) media
    members; a sample that would overflow it is not kept (fetched again when its bin is due).
    Lives only as long as one pass of the iterator: it is not part of the checkpoint."""

    def __init__(self, capacity: int):
        self.capacity, self.size = capacity, 0
        self._items: dict[int, tuple[Any, int]] = {}

    def put(self, sid: int, sample: Any) -> None:
        size = sum(len(v) for v in sample.members.values() if isinstance(v, bytes | bytearray))
        if self.size + size <= self.capacity:
            self._items[sid] = (sample, size)
            self.size += size

    def pop(self, sid: int) -> Any | None:
        """The sample, or None when it was not kept."""
        got = self._items.pop(sid, None)
        if got is None:
            return None
        self.size -= got[1]
        return got[0]

    def __len__(self) -> int:
        return len(self._items)


class OnlinePackingDataset(BaseWrapperDataset):
    """Planned samples -> packed samples, one per round for this rank (see module doc)."""

    _savable_fields = ("_packer_state", "_restore_keys", "_pack_index")

    def __init__(self, dataset, *, encoder, worker_config: WorkerConfig):
        """``encoder``: the :class:`~omni_train.data.task_encoder.OmniTaskEncoder` (its
        ``packing`` config, ranks, ``packed_length``, ``cost``, ``postencode_sample``,
        ``pack_selected_samples``, ``quiet``)."""
        super().__init__(dataset, worker_config=worker_config)
        self.encoder = encoder
        pk = encoder.packing
        self.buffer_size = pk.buffer_size
        self.plan_cache_bytes = pk.plan_cache_mib << 20
        self._make_packer = lambda state: OnlinePacker(
            encoder.context_length,
            encoder.num_ranks,
            min_fill=pk.min_fill,
            max_wait=pk.max_wait,
            state=state,
        )
        self.reset_state_own()

    def reset_state_own(self) -> None:
        self._packer_state = OnlinePacker.initial_state()
        self._restore_keys: dict[int, Any] = {}  # packer sample id -> energon restore key
        self._pack_index = SampleIndex(self.worker_config, src=self)

    def len_worker(self, worker_idx: int | None = None) -> int:
        return self.dataset.len_worker(worker_idx)  # unknown after packing: an upper bound

    def __iter__(self) -> Iterator:
        packer = self._make_packer(self._packer_state)
        cache = PlanCache(self.plan_cache_bytes)  # empty after a restore: those are re-read
        source = iter(self.dataset)
        ended = False
        while True:
            if packer.needs_samples():
                while not ended and len(packer) < self.buffer_size:
                    try:
                        sample = next(source)
                    except StopIteration:
                        ended = True
                        break
                    sid = packer.add(self.encoder.packed_length(sample), self.encoder.cost(sample))
                    self._restore_keys[sid] = get_sample_restore_key(sample)
                    cache.put(sid, sample)
                if not len(packer):
                    return
                packer.repack()
            bins = packer.next_round()
            mine = bins[self.encoder.rank]
            keys = [self._restore_keys.pop(sid) for sid in mine]
            planned = [cache.pop(sid) for sid in mine]
            for other in bins:  # samples dealt to other ranks: theirs to train on
                for sid in other:
                    self._restore_keys.pop(sid, None)
                    cache.pop(sid)
            with self._pack_index.ctx() as pack_idx:
                packed = self._pack(keys, planned)
            yield set_sample_restore_key(packed, pack_idx, *keys, src=self)

    def _pack(self, keys: list, planned: list | None = None) -> Any:
        """Decode and pack the samples of ``keys``; ``planned[i]``, when given and not None,
        is sample ``i`` already planned (else it is fetched again by its key)."""
        samples = []
        for key, sample in zip(keys, planned or [None] * len(keys), strict=True):
            if sample is None:
                with self.encoder.quiet():
                    sample = self.dataset.restore_sample(key)
            with contextlib.suppress(SkipSample):  # counted by the encoder; the bin goes without
                samples.append(self.encoder.postencode_sample(sample))
        return self.encoder.pack_selected_samples(samples)

    def restore_sample(self, restore_key: Any) -> Any:
        name, pack_idx, *keys = restore_key
        assert name == type(self).__name__, restore_key
        with self._pack_index.ctx(pack_idx):
            packed = self._pack(keys)
        return set_sample_restore_key(packed, pack_idx, *keys, src=self)

    def config(self) -> dict[str, Any]:
        pk = self.encoder.packing
        return {
            "type": type(self).__qualname__,
            "capacity": self.encoder.context_length,
            "num_ranks": self.encoder.num_ranks,
            "rank": self.encoder.rank,
            "buffer_size": pk.buffer_size,
            "min_fill": pk.min_fill,
            "max_wait": pk.max_wait,
            "dataset": self.dataset.config(),
            "worker_config": self.worker_config.config(),
        }

    def __str__(self) -> str:
        return f"OnlinePackingDataset(buffer_size={self.buffer_size}, dataset={self.dataset})"
