"""Parallel config: one layout for the whole job (TP/CP/EP/PP, sequence parallel); the model
config says nothing about it."""

from __future__ import annotations

from dataclasses import dataclass

from omni_train.config.checks import positive


@dataclass
class ParallelConfig:
    """How the job is laid out. The data-parallel size is derived: world / (tp x cp x pp)."""

    tp: int = 1
    sp: bool = False  # sequence parallel (needs tp > 1 to mean anything)
    cp: int = 1
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel; None: same as tp (megatron's default)
    pp: int = 1  # pipeline parallel: fixed at 1 for now
    moe_token_dispatcher: str = "alltoall"  # "alltoall" | "allgather"
    distributed_optimizer: bool = True
    # How Transformer Engine's attention exchanges keys/values over the CP group (GPU):
    # p2p (ring), all_gather, a2a (megatron-core's cp_comm_type). The CPU platform all-gathers.
    cp_comm_type: str = "p2p"

    def __post_init__(self) -> None:
        positive("parallel", tp=self.tp, cp=self.cp, ep=self.ep, etp=self.expert_tp, pp=self.pp)
        if self.pp != 1:
            raise ValueError(f"parallel.pp={self.pp}: pipeline parallelism is not supported; set 1")
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            raise ValueError(
                f"parallel.moe_token_dispatcher={self.moe_token_dispatcher!r}; "
                "valid: alltoall, allgather"
            )
        if self.cp_comm_type not in ("p2p", "all_gather", "a2a"):
            raise ValueError(
                f"parallel.cp_comm_type={self.cp_comm_type!r}; valid: p2p, all_gather, a2a"
            )

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.cp * self.pp)
