"""megatron-core DDP, distributed optimizer and LR/WD scheduler from our config."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import Float16Module
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from omni_train.config import JobConfig


def wrap_ddp(cfg: JobConfig, module: torch.nn.Module, tf_config: TransformerConfig):
    """Wrap in megatron-core DDP (inside Float16Module under bf16, as megatron's get_model does:
    inputs cast to bf16, outputs back to fp32). Frozen parameters get no gradient buffer."""
    if tf_config.bf16:
        module = Float16Module(tf_config, module)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    ddp = DistributedDataParallel(config=tf_config, ddp_config=ddp_config, module=module)
    # The schedule calls these: gradient all-reduce / reduce-scatter, SP norm-grad all-reduce,
    # the TP all-reduce of encoders sharded over TP, and division of every gradient by the
    # global count of loss tokens.
    tf_config.finalize_model_grads_func = finalize_grads
    tf_config.no_sync_func = ddp.no_sync
    return ddp


def finalize_grads(model: list[torch.nn.Module], *args, **kwargs) -> None:
    """megatron's ``finalize_model_grads``, then the gradients of parameters marked
    ``partial_over_tp`` summed over the TP group: an encoder that is not tensor parallel but
    shares its inputs out over the TP ranks (the audio encoder: ``omni_train.model.omni``) has
    each TP rank's gradient from its own inputs only. Megatron does the same for SP norms
    (``sequence_parallel``); its gradients are already scaled by the token count, and a sum
    commutes with that."""
    finalize_model_grads(model, *args, **kwargs)
    group = mpu.get_tensor_model_parallel_group()
    if mpu.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [
        g
        for chunk in model
        for p in chunk.parameters()
        if p.requires_grad and getattr(p, "partial_over_tp", False)
        for g in [getattr(p, "main_grad", None) if hasattr(p, "main_grad") else p.grad]
        if g is not None
    ]
    if grads:
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)


def build_optimizer(cfg: JobConfig, ddp_model, tf_config: TransformerConfig):
    o, t = cfg.optimizer, cfg.trainer
    lr, min_lr = o.lr * o.lr_scale, o.min_lr * o.lr_scale
    opt_config = MegatronOptimizerConfig(
        optimizer="adam",  # megatron's "adam" is AdamW (decoupled weight decay)
        lr=lr,
        min_lr=min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=tf_config.bf16,
        params_dtype=tf_config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    warmup = int(round(o.warmup_fraction * t.train_steps))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=t.train_steps,  # scheduler steps count optimizer steps, not samples
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.train_steps,
        wd_incr_style="constant",
        # On resume, megatron takes the schedule from the checkpoint ("keep"), or from these
        # settings from the checkpoint's step on ("rescale"); omni_train.stage.resume says which.
        use_checkpoint_opt_param_scheduler=cfg.checkpoint.on_schedule_change != "rescale",
        override_opt_param_scheduler=cfg.checkpoint.on_schedule_change == "rescale",
    )
    return optimizer, scheduler
