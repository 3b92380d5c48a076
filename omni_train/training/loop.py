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

from omni_train.checkpoint import TrainState
from omni_train.config import JobConfig
from omni_train.log import get_logger
from omni_train.platform import detect
from omni_train.training.forward_step import forward_step

log = get_logger()


def _reduce_loss(reports: list[dict]) -> tuple[float, int]:
    """Mean loss over real tokens of all micro-batches and data-parallel ranks; token count."""
    total = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        total += report["lm loss"].detach().to("cpu", torch.float64)
    # On the platform's device: NCCL needs CUDA tensors, gloo CPU ones (also when the CPU path
    # is forced on a GPU machine with OMNI_TRAIN_PLATFORM=cpu).
    total = total.to(detect().device)
    dist.all_reduce(total, group=mpu.get_data_parallel_group(with_context_parallel=True))
    loss_sum, count = total.tolist()
    return loss_sum / max(count, 1.0), int(count)


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
    data,
    state: TrainState,
    save: Callable[[TrainState], None],
    stop: Callable[[], str | None] | None = None,
) -> TrainState:
    """Run optimizer steps until ``trainer.train_steps`` (or ``exit_after_steps`` more steps);
    ``save`` is called at save intervals. ``stop`` (collective, after every step) returns a
    reason to end the run early (a signal): the loop returns with ``state.stop_reason`` set."""
    t = cfg.trainer
    last = t.train_steps
    if t.exit_after_steps:
        last = min(last, state.step + t.exit_after_steps)
    forward_backward = get_forward_backward_func()
    model.train()
    while state.step < last:
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=forward_step,
            data_iterator=data,
            model=[model],
            num_microbatches=data.num_microbatches,
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=False,
        )
        lr = optimizer.param_groups[0]["lr"]  # the LR this step applies
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=1)
        with torch.no_grad():
            average_running_stats(model)
        loss, num_tokens = _reduce_loss(reports)
        elapsed = time.perf_counter() - start
        state.step += 1
        state.losses.append(loss)
        state.grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
        state.wall_time_s += elapsed
        data_report = data.end_step()  # collective; raises when too many samples were bad
        state.data = data.state_dict()  # (the per-rank loader state is taken when saving)
        if state.step % t.log_interval == 0 or state.step == t.train_steps:
            log.info(
                "step %d/%d | loss %.6f | grad_norm %s | lr %.3e | tokens/s %.0f%s%s",
                state.step,
                t.train_steps,
                loss,
                f"{grad_norm:.4f}" if grad_norm is not None else "n/a",
                lr,
                num_tokens / elapsed,
                "" if update_ok else " | step skipped (non-finite gradients)",
                "".join(f" | {k} {v}" for k, v in data_report.items()),
            )
        if t.save_interval and state.step % t.save_interval == 0 and state.step < last:
            save(state)
        if stop is not None and state.step < last and (reason := stop()):
            state.stop_reason = reason
            break
    return state


@torch.no_grad()
def evaluate(cfg: JobConfig, model, data) -> float | None:
    """Mean token loss over ``trainer.eval_iters`` held-out micro-batches per rank."""
    if cfg.trainer.eval_iters == 0:
        return None
    model.eval()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=[model],
        num_microbatches=cfg.trainer.eval_iters,
        seq_length=cfg.trainer.seq_length,
        micro_batch_size=cfg.trainer.micro_batch_size,
        forward_only=True,
    )
    model.train()
    data.restart()  # evaluate the same samples every time
    return _reduce_loss(reports)[0]
