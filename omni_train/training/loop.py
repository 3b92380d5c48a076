"""The generic training loop: megatron-core's forward/backward schedule, optimizer and scheduler.

Nothing here knows about modalities; the forward step does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.pipeline_parallel import get_forward_backward_func

from omni_train.checkpoint.io import TrainState
from omni_train.config import JobConfig
from omni_train.data.microbatch import EvalStream, MicroBatch, TrainStream
from omni_train.log import get_logger
from omni_train.platform import detect
from omni_train.training.flops import FlopsPolicy, device_peak_tflops
from omni_train.training.forward_step import make_forward_step
from omni_train.training.metrics import MODALITIES, MetricsLogger

log = get_logger()


def _reduce(reports: list[dict]) -> tuple[float, dict[str, float], float, float]:
    """(mean loss over real tokens, mean loss per modality, model FLOPs, hardware FLOPs) over
    all micro-batches and data-parallel ranks."""
    device = detect().device  # NCCL needs CUDA tensors, gloo CPU ones
    totals = torch.zeros(2, dtype=torch.float64)
    modal = torch.zeros(len(MODALITIES), 2, dtype=torch.float64)
    work = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        totals += report["lm loss"].detach().to("cpu", torch.float64)
        if "modality loss" in report:
            modal += report["modality loss"].detach().to("cpu", torch.float64)
            work += report["flops"].to(torch.float64)
    # tokens are split over data-parallel and context-parallel ranks; a micro-batch's FLOPs
    # are counted once per data-parallel rank (its TP and CP peers share the same micro-batch)
    packed = torch.cat([totals, modal.reshape(-1)]).to(device)
    dist.all_reduce(packed, group=mpu.get_data_parallel_group(with_context_parallel=True))
    work = work.to(device)
    dist.all_reduce(work, group=mpu.get_data_parallel_group())
    packed, work = packed.cpu(), work.cpu()
    loss_sum, count = packed[0].item(), packed[1].item()
    per = packed[2:].reshape(-1, 2)
    by_modality = {
        m: per[i, 0].item() / per[i, 1].item() for i, m in enumerate(MODALITIES) if per[i, 1] > 0
    }
    return loss_sum / max(count, 1.0), by_modality, work[0].item(), work[1].item()


def _memory_gib(device: torch.device) -> float:
    """GPU: the most allocated so far; CPU: the resident set now. The maximum over ranks."""
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        value = 0.0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    value = int(line.split()[1]) / 2**20
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _peak_tflops(cfg: JobConfig, device: torch.device) -> float | None:
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops
    if device.type == "cuda":
        return device_peak_tflops(torch.cuda.get_device_name(device))
    return None


class _TimedData:
    """The data iterator, timing how long the step waits for its micro-batches."""

    def __init__(self, data: TrainStream):
        self.data = data
        self.wait_s = 0.0

    def __iter__(self):
        return self

    def __next__(self) -> MicroBatch:
        start = time.perf_counter()
        try:
            return next(self.data)
        finally:
            self.wait_s += time.perf_counter() - start


def average_running_stats(model) -> None:
    """Average BatchNorm running statistics (the FastConformer's conv modules) over the
    data-parallel ranks. Each rank updates them from its own micro-batches and megatron's DDP
    reduces gradients only, so without this the ranks' copies drift apart, and a checkpoint
    (which stores one copy) would resume a different model on every rank but one."""
    group = mpu.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) == 1:
        return
    norms = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.training  # eval-mode norms (a frozen encoder's) keep their loaded statistics
    ]
    if not norms:
        return
    stats = [t for m in norms for t in (m.running_mean, m.running_var)]
    flat = torch.cat([t.reshape(-1).float() for t in stats])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for t, v in zip(stats, flat.split([t.numel() for t in stats]), strict=True):
        t.copy_(v.view_as(t))
    counts = torch.stack([m.num_batches_tracked for m in norms])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    for m, c in zip(norms, counts, strict=True):
        m.num_batches_tracked.copy_(c)


def train(
    cfg: JobConfig,
    model,
    optimizer,
    scheduler,
    data: TrainStream,
    state: TrainState,
    save: Callable[[TrainState], None],
    stop: Callable[[], str | None] | None = None,
    logger: MetricsLogger | None = None,
    on_eval: Callable[[TrainState], None] | None = None,
    *,
    flops_policy: FlopsPolicy,
) -> TrainState:
    """Run optimizer steps until ``trainer.train_steps`` (or ``exit_after_steps`` more steps);
    ``save`` is called at save intervals, ``on_eval`` every ``trainer.eval_interval`` steps.
    ``stop`` (collective, after every step) returns a reason to end the run early (a signal):
    the loop returns with ``state.stop_reason`` set. Every step's scalars go to ``logger``
    (``omni_train.training.metrics`` names them) and to ``state.metrics``. Each step's FLOPs
    are counted under ``flops_policy``.

    ``data`` yields one :class:`MicroBatch` per ``next()`` (``data.num_microbatches`` per step);
    after each step its ``end_step()`` returns the step's ``samples``, real ``tokens`` and
    ``positions`` (tokens with padding), plus ``skipped`` {reason: count} if any, and
    ``state_dict()`` the data position (:class:`~omni_train.data.microbatch.TrainStream`)."""
    t = cfg.trainer
    last = t.train_steps
    if t.exit_after_steps:
        last = min(last, state.step + t.exit_after_steps)
    forward_backward = get_forward_backward_func()
    forward_step = make_forward_step(cfg.model, flops_policy)
    device = detect().device
    peak = _peak_tflops(cfg, device)
    world = dist.get_world_size()
    logger = logger or MetricsLogger(cfg, is_main=dist.get_rank() == 0, first_step=state.step)
    model.train()
    while state.step < last:
        start = time.perf_counter()
        timed = _TimedData(data)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=forward_step,
            data_iterator=timed,
            model=[model],
            num_microbatches=data.num_microbatches,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        lrs = [group["lr"] for group in optimizer.param_groups]  # the LRs this step applies
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=1)
        with torch.no_grad():
            average_running_stats(model)
        loss, by_modality, model_flops, hw_flops = _reduce(reports)
        elapsed = time.perf_counter() - start
        state.step += 1
        state.losses.append(loss)
        state.grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
        state.wall_time_s += elapsed
        data_report = data.end_step()  # collective; raises when too many samples were bad
        state.data = data.state_dict()  # (the per-rank loader state is taken when saving)
        scalars = {
            "step": state.step,
            "train/loss": loss,
            **{f"train/loss/{m}": v for m, v in by_modality.items()},
            "train/grad_norm": state.grad_norms[-1],
            **{f"train/lr/group{k}": lr for k, lr in enumerate(lrs)},
            "throughput/tokens_per_s": data_report["tokens"] / elapsed,
            "throughput/samples_per_s": data_report["samples"] / elapsed,
            "throughput/tflops_per_gpu": model_flops / elapsed / world / 1e12,
            "throughput/hw_tflops_per_gpu": hw_flops / elapsed / world / 1e12,
            "data/tokens": state.data.get("num_tokens", 0),
            "data/padding": 1 - data_report["tokens"] / max(data_report["positions"], 1),
            "data/wait_s": timed.wait_s,
            **{f"data/skipped/{k}": v for k, v in data_report.get("skipped", {}).items()},
            "memory/gib": _memory_gib(device),
            "time/step_s": elapsed,
        }
        if peak is not None:
            scalars["throughput/mfu"] = scalars["throughput/tflops_per_gpu"] / peak
        eta_stage, eta_all = logger.eta(state.step, elapsed, scalars["throughput/tokens_per_s"])
        scalars["time/eta_stage_s"] = eta_stage
        if eta_all is not None:
            scalars["time/eta_curriculum_s"] = eta_all
        state.metrics.append(scalars)
        logger.step(state.step, scalars)
        if not update_ok and dist.get_rank() == 0:
            log.warning("step %d skipped: non-finite gradients", state.step)
        periodic = t.eval_interval and state.step % t.eval_interval == 0
        if on_eval and periodic and state.step < t.train_steps:  # the end evaluates anyway
            on_eval(state)
        if t.save_interval and state.step % t.save_interval == 0 and state.step < last:
            save(state)
        if stop is not None and state.step < last and (reason := stop()):
            state.stop_reason = reason
            break
    return state


@torch.no_grad()
def evaluate(
    cfg: JobConfig, model, data: EvalStream | None, *, flops_policy: FlopsPolicy
) -> tuple[float | None, dict[str, float]]:
    """Mean token loss over ``trainer.eval_iters`` held-out micro-batches per rank, and the
    mean per modality of sample (``data`` is None only when ``trainer.eval_iters=0``)."""
    if cfg.trainer.eval_iters == 0:
        return None, {}
    assert data is not None  # build_data makes an eval stream whenever eval_iters > 0
    model.eval()
    reports = get_forward_backward_func()(
        forward_step_func=make_forward_step(cfg.model, flops_policy),
        data_iterator=data,
        model=[model],
        num_microbatches=cfg.trainer.eval_iters,
        seq_length=cfg.trainer.seq_length,
        micro_batch_size=cfg.trainer.micro_batch_size,
        forward_only=True,
    )
    model.train()
    data.restart()  # evaluate the same samples every time
    loss, by_modality, _, _ = _reduce(reports)
    return loss, by_modality
