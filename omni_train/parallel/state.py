"""torch.distributed + megatron-core parallel state, initialised once per process.

Launch contract: torchrun (or Slurm via launchers/) sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; a plain ``python`` start is treated as a world of one.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from omni_train.config import ParallelConfig
from omni_train.platform import Platform


@dataclass(frozen=True)
class ParallelState:
    world_size: int
    rank: int
    tp: int
    cp: int
    ep: int
    etp: int
    dp: int
    tp_rank: int
    dp_rank: int
    ep_rank: int
    pg: ProcessGroupCollection

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (
            f"world={self.world_size} tp={self.tp} cp={self.cp} dp={self.dp} "
            f"ep={self.ep} etp={self.etp}"
        )


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(cfg: ParallelConfig, platform: Platform, seed: int) -> ParallelState:
    """Initialise the default process group, megatron's groups and the model-parallel RNG."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=platform.backend, timeout=timedelta(minutes=10))
    return init_model_parallel(cfg, seed)


def init_model_parallel(
    cfg: ParallelConfig, seed: int, *, gloo_groups: bool = True
) -> ParallelState:
    """megatron's groups and the model-parallel RNG over the initialised default group.
    ``gloo_groups=False``: no gloo side groups (the dry run's fake world cannot make them)."""
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        context_parallel_size=cfg.cp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=cfg.expert_tp,
        create_gloo_process_groups=gloo_groups,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelState(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp=cfg.tp,
        cp=cfg.cp,
        ep=cfg.ep,
        etp=cfg.expert_tp,
        dp=mpu.get_data_parallel_world_size(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        ep_rank=mpu.get_expert_model_parallel_rank(),
        pg=ProcessGroupCollection.use_mpu_process_groups(),
    )


def destroy_parallel() -> None:
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def local_world(cfg: ParallelConfig, platform: Platform, seed: int) -> Iterator[ParallelState]:
    """A world of one process on a free local port, torn down on exit: the inspection and
    conversion tools (model summary, checkpoint import/export) build models in it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        ps = init_parallel(cfg, platform, seed)
        try:
            yield ps
        finally:
            destroy_parallel()
    finally:  # the caller's environment as it was (later child processes inherit it)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
