"""Packed vs unpacked training of the tiny omni model (torchrun, 2 ranks = DP 2, fp32).

1. packed: 2 steps of the real training loop on the energon stream, packed with global
   balance (one bin per rank per step); each rank records the samples of its bins.
2. unpacked: the same initial weights and RNG state, the same samples per rank and step, as
   one padded ``[b, s]`` micro-batch per step (``b`` = the bin's samples), same loop.

Rank 0 writes ``OUT/packing.json``: both runs' losses and gradient norms, the bins.

Usage: torchrun --nproc-per-node 2 tests/packing_probe.py SYNTH_ROOT OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from omni_train.checkpoint.io import TrainState
from omni_train.config import compose_job
from omni_train.data import build_data
from omni_train.data.loader import task_encoder, to_device
from omni_train.data.task_encoder import cook_raw
from omni_train.datatools.prepare import read_raw
from omni_train.datatools.synth_media import CATEGORIES
from omni_train.model.assembly import build_model
from omni_train.parallel.state import destroy_parallel, init_parallel
from omni_train.platform import setup
from omni_train.training.flops import FlopsPolicy
from omni_train.training.loop import train
from omni_train.training.optimizer import build_optimizer, wrap_ddp


class Recorded:
    """Batches given up front, one micro-batch per step (the loop's data interface)."""

    num_microbatches = 1

    def __init__(self, batches: list[dict]):
        self.batches = iter(batches)
        self.step = {"samples": 0, "tokens": 0, "positions": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.batches)
        mask = batch.loss_mask
        self.step["samples"] += len(batch.media.sample_names)
        self.step["tokens"] += int(mask.sum())
        self.step["positions"] += mask.numel()
        return batch

    def end_step(self) -> dict:
        """This rank's counts (the loop only logs them; the probe compares losses)."""
        step, self.step = self.step, {"samples": 0, "tokens": 0, "positions": 0}
        return step

    def state_dict(self) -> dict:
        return {}


class Recording:
    """Wraps the packed stream and keeps the sample keys of every bin it hands out."""

    def __init__(self, data):
        self.data, self.bins = data, []
        self.num_microbatches = data.num_microbatches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.data)
        self.bins.append(list(batch.media.sample_names))
        return batch

    def end_step(self) -> dict:
        return self.data.end_step()

    def state_dict(self) -> dict:
        return self.data.state_dict()


def run(cfg, ps, platform, data, rng: torch.Tensor, init: dict) -> TrainState:
    """Train from the weights ``init`` (filled on the first call) and the RNG state ``rng``."""
    built = build_model(cfg, ps, platform)
    if init:
        built.module.load_state_dict(init)
    else:
        init.update({k: v.clone() for k, v in built.module.state_dict().items() if v is not None})
    model = wrap_ddp(cfg, built.module, built.tf_config)
    optimizer, scheduler = build_optimizer(cfg, model, built.tf_config)
    torch.set_rng_state(rng)  # the CPE crop and the mel dither draw from it
    policy = FlopsPolicy.from_config(cfg)
    return train(
        cfg, model, optimizer, scheduler, data, TrainState(), lambda s: None, flops_policy=policy
    )


def main() -> None:
    root, out = sys.argv[1], Path(sys.argv[2])
    cfg = compose_job(
        [
            "stage=smoke_omni",
            "model=tiny",
            "parallel=single",
            f"data.synthetic_root={root}",
            f"checkpoint.output_dir={out}",
            "trainer.micro_batch_size=1",
            "trainer.global_batch_size=2",
            "trainer.train_steps=2",
            "data.packing.enabled=true",
            "data.packing.buffer_size=24",
            "data.num_workers=0",
        ]
    )
    platform = setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    rng, init = torch.get_rng_state(), {}
    packed_data, _ = build_data(cfg, ps, platform.device)
    recording = Recording(packed_data)
    packed = run(cfg, ps, platform, recording, rng, init)

    raw = {
        key: (members, category)
        for category in CATEGORIES
        for key, members in read_raw(Path(root) / category, "train")
    }
    te = task_encoder(cfg, training=True)
    te.packing = None  # the same encoder settings, unpacked
    batches = []
    for keys in recording.bins:
        samples = [te.encode(cook_raw(k, *raw[k])) for k in keys]
        batches.append(to_device(te.batch(samples), platform.device))
    unpacked = run(cfg, ps, platform, Recorded(batches), rng, init)
    if ps.is_main:
        result = {
            "packed_losses": packed.losses,
            "unpacked_losses": unpacked.losses,
            "packed_grad_norms": packed.grad_norms,
            "unpacked_grad_norms": unpacked.grad_norms,
            "bins": recording.bins,
            "num_samples": packed_data.state_dict()["num_samples"],
        }
        (out / "packing.json").write_text(json.dumps(result, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
