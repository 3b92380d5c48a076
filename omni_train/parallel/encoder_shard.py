"""Media encoders sharded over the ranks that share a micro-batch (context and tensor parallel).

Every rank of a context-parallel group reads the same micro-batch. Running the encoders on all of
its media on every rank (what megatron-core's LLaVA model does) repeats the ViT ``cp`` times and
keeps ``cp`` copies of its activations. Instead, each rank of an *encoder group* encodes only its
share of the media items, and the features reach the ranks whose token positions hold them:

* **vision**: the group is the CP group (the ViT is tensor parallel, so the TP ranks of one CP
  rank encode the same pieces together). A piece is an image or one video tubelet; the projector
  runs on the owner, and the projected ``[n, hidden]`` rows are exchanged;
* **audio**: the group is TP x CP (the conformer is not tensor parallel, so every rank of the
  group can encode different clips). The conformer's ``[n, d_model]`` rows are exchanged, and the
  (tensor-parallel) projector runs on the receiving ranks, on their positions only.

What moves: an all-to-all (:func:`exchange_rows`) that sends each feature row only to the ranks
whose CP shard holds its position: about ``rows / cp`` received per rank, where an all-gather would
deliver every row everywhere. Its backward sends each row's gradient back to its owner once (of
the TP copies a row was sent to, the one with the owner's TP rank answers: the TP copies of a
gradient are equal, because a tensor-parallel projector all-reduces its input gradient).

Assignment (:func:`assign`) is a pure function of the items' costs, so every rank computes the
same one from the micro-batch alone, and a resumed run the same as an uninterrupted one.

This module holds the index math and the exchange; what an item costs and how an encoder runs
on a subset live with the model (``omni_train.model.omni``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def assign(costs: list[int], num_ranks: int) -> list[int]:
    """Owner rank of each item: longest processing time first (the costliest item goes to the
    least loaded rank; ties to the lower item index, then the lower rank). Deterministic.

    Greedy LPT is within 4/3 of the best possible largest load, and far closer when items are
    many and small against the total, as media items of a packed sequence are."""
    loads = [0] * num_ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(num_ranks), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def loads(costs: list[int], owner: list[int], num_ranks: int) -> list[int]:
    """Total cost per rank of an assignment."""
    out = [0] * num_ranks
    for c, r in zip(costs, owner, strict=True):
        out[r] += c
    return out


@dataclass(frozen=True)
class EncoderGroup:
    """The ranks that share a micro-batch's media for one encoder. Member ``m`` has CP rank
    ``m // tp`` and TP rank ``m % tp`` (megatron's rank order: TP varies fastest); ``tp`` is 1
    for a group over CP only."""

    group: object | None  # torch ProcessGroup; None for a group of one
    size: int
    rank: int
    tp: int

    @property
    def cp(self) -> int:
        return self.size // self.tp


SINGLE = EncoderGroup(None, 1, 0, 1)


def encoder_groups(context_sharded: bool) -> tuple[EncoderGroup, EncoderGroup]:
    """(vision group, audio group) of this rank from megatron's parallel state. With the
    sequence sharded over CP (``context_sharded``): CP, and TP x CP; without (every CP rank
    holds the whole sequence): none, and TP. A process without megatron's groups (one
    process, a tool) gets groups of one."""
    from megatron.core import parallel_state as mpu

    if not (dist.is_initialized() and mpu.model_parallel_is_initialized()):
        return SINGLE, SINGLE
    tp, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
    cp, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
    if not context_sharded:
        cp, cp_rank = 1, 0
    vision = audio = SINGLE
    if cp > 1:
        group = mpu.get_context_parallel_group()
        vision = EncoderGroup(group, cp, cp_rank, 1)
        _check_rank(group, cp_rank, "context-parallel")
    if tp * cp > 1:
        if cp > 1:
            group, name = mpu.get_tensor_and_context_parallel_group(), "tensor-and-context"
        else:
            group, name = mpu.get_tensor_model_parallel_group(), "tensor"
        audio = EncoderGroup(group, tp * cp, cp_rank * tp + tp_rank, tp)
        _check_rank(group, audio.rank, f"{name}-parallel")
    return vision, audio


def _check_rank(group, expected: int, name: str) -> None:
    got = dist.get_rank(group)
    if got != expected:
        raise RuntimeError(
            f"this rank is rank {got} of megatron's {name} group, but sharded encoding expects "
            f"{expected} (TP rank fastest, then CP rank): megatron's rank order changed"
        )


@dataclass(frozen=True)
class Route:
    """Where the rows of an exchange go, seen from one member (lists are per member).

    Forward: ``send_index`` (local rows, in send order) split by ``send_splits``; the received
    buffer (``recv_splits``) reordered by ``recv_order`` gives the rows this member needs, in
    increasing global row order. Backward: ``back_index`` (indices into those needed rows) split
    by ``back_splits`` go to their owners; an owner writes what it receives (``back_recv_splits``)
    into its local rows ``back_target``."""

    num_local: int
    num_needed: int
    send_index: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_order: torch.Tensor
    back_index: torch.Tensor
    back_splits: list[int]
    back_recv_splits: list[int]
    back_target: torch.Tensor


def build_route(owner: torch.Tensor, dest_cp: torch.Tensor, g: EncoderGroup) -> Route:
    """The exchange for member ``g.rank``: global feature row ``i`` is computed by member
    ``owner[i]`` and needed by every member whose CP rank is ``dest_cp[i]`` (the CP rank holding
    the row's token position). Local rows of a member are its owned rows in global order.

    ``owner``, ``dest_cp``: int64 ``[N]`` over the micro-batch's rows of one modality."""
    me, tp, size = g.rank, g.tp, g.size
    member_cp = torch.arange(size) // tp
    member_tp = torch.arange(size) % tp
    mine = (owner == me).nonzero().flatten()  # global rows I own, in order
    need = (dest_cp == me // tp).nonzero().flatten()  # global rows I need, in order
    # forward send: my rows to every member of the CP rank that holds them, member by member
    send_parts, send_splits = [], []
    for q in range(size):
        rows = (dest_cp[mine] == member_cp[q]).nonzero().flatten()
        send_parts.append(rows)
        send_splits.append(rows.numel())
    src = owner[need]
    by_src = torch.sort(src, stable=True).indices  # receive buffer order: by source, then row
    recv_splits = torch.bincount(src, minlength=size).tolist()
    recv_order = torch.empty_like(by_src)
    recv_order[by_src] = torch.arange(by_src.numel())
    # backward: the gradient of each needed row goes to its owner if the owner has my TP rank
    answer = member_tp[src] == me % tp
    back_index = by_src[answer[by_src]]
    back_splits = torch.bincount(src[answer], minlength=size).tolist()
    back_recv, back_target = [], []
    for q in range(size):
        if member_tp[q] == me % tp:
            back_recv.append(send_splits[q])
            back_target.append(send_parts[q])
        else:
            back_recv.append(0)
    empty = torch.zeros(0, dtype=torch.int64)
    return Route(
        num_local=mine.numel(),
        num_needed=need.numel(),
        send_index=torch.cat(send_parts) if send_parts else empty,
        send_splits=send_splits,
        recv_splits=recv_splits,
        recv_order=recv_order,
        back_index=back_index,
        back_splits=back_splits,
        back_recv_splits=back_recv,
        back_target=torch.cat(back_target) if back_target else empty,
    )


def _all_to_all(rows: torch.Tensor, recv: list[int], send: list[int], group) -> torch.Tensor:
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
    return out


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route: Route, group):
        ctx.route, ctx.group = route, group
        index = route.send_index.to(x.device)
        buf = _all_to_all(x.index_select(0, index), route.recv_splits, route.send_splits, group)
        return buf.index_select(0, route.recv_order.to(x.device))

    @staticmethod
    def backward(ctx, grad):
        r = ctx.route
        send = grad.index_select(0, r.back_index.to(grad.device))
        buf = _all_to_all(send, r.back_recv_splits, r.back_splits, ctx.group)
        out = grad.new_zeros((r.num_local, *grad.shape[1:]))
        out.index_copy_(0, r.back_target.to(grad.device), buf)
        return out, None, None


def exchange_rows(x: torch.Tensor, route: Route, g: EncoderGroup) -> torch.Tensor:
    """``x`` ``[route.num_local, d]`` (this member's rows) -> ``[route.num_needed, d]`` (the
    rows its CP shard holds, in global order). Every member of the group must call it."""
    if x.shape[0] != route.num_local:
        raise RuntimeError(f"exchange: {x.shape[0]} local rows; the route has {route.num_local}")
    return _Exchange.apply(x, route, g.group)
