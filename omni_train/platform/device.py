"""Patches for the CPU device: megatron-core 0.16.1 on a CPU (gloo), also on a GPU host.

Megatron-core's layer, optimizer, DDP and checkpoint code is device-agnostic except for a set of
CUDA-only calls. These sets patch exactly those, and only where the chosen device is the CPU
(``Platform.patch_sets``: no CUDA, or ``OMNI_TRAIN_PLATFORM=cpu``):

* ``cpu_device``: in each listed megatron module the global ``torch`` becomes :data:`CPU_TORCH`,
  a proxy that forwards everything to the real ``torch`` except ``torch.cuda`` (a CPU stand-in:
  ``current_device()`` is the CPU, streams/events/synchronize are no-ops, the "device RNG" is
  the CPU generator, ``is_available()`` is False) and the tensor factories, whose
  ``device="cuda"`` argument is mapped to the CPU. Plus the RNG state get/set megatron routes
  through ``torch.cuda._lazy_call``, the MoE split-size host copy, the
  ``x.type() == 'torch.cuda.FloatTensor'`` checks, and megatron's optimizer class choice (a GPU
  host's Transformer Engine / apex fused Adam cannot step CPU tensors).
* ``gloo_collectives``: the uneven all-gather / reduce-scatter gloo lacks.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

from omni_train.platform.registry import AttributePatch, PatchSet, ProxyTarget, SourcePatch

_CPU = torch.device("cpu")


class _NullStream:
    """Stand-in for torch.cuda.Stream / Event: CPU ops are synchronous, so every wait is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullStream:
        return self

    def record(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


_CURRENT_STREAM = _NullStream()


def _cpu_rng_state(device: Any = None) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, device: Any = None) -> None:
    torch.set_rng_state(state)


class _CpuCuda(types.SimpleNamespace):
    """What ``torch.cuda`` means inside a patched megatron module on the CPU platform.

    The "current device" is the CPU and the device RNG is the CPU default generator, the one CPU
    kernels (dropout, init) actually draw from. It reports no CUDA device, also on a GPU host
    (``OMNI_TRAIN_PLATFORM=cpu``); anything not defined here falls through to the real
    ``torch.cuda``.
    """

    def __init__(self) -> None:
        super().__init__(
            current_device=lambda: _CPU,
            synchronize=lambda device=None: None,
            Stream=_NullStream,
            Event=_NullStream,
            current_stream=lambda device=None: _CURRENT_STREAM,
            stream=lambda s=None: contextlib.nullcontext(),
            get_rng_state=_cpu_rng_state,
            set_rng_state=_set_cpu_rng_state,
            manual_seed=torch.manual_seed,
            manual_seed_all=torch.manual_seed,
            empty_cache=lambda: None,
            is_available=lambda: False,
            device_count=lambda: 0,
            memory_allocated=lambda device=None: 0,
            max_memory_allocated=lambda device=None: 0,
            nvtx=types.SimpleNamespace(
                range_push=lambda *a, **k: None,
                range_pop=lambda *a, **k: None,
                range=lambda *a, **k: contextlib.nullcontext(),
            ),
        )
        self.random = types.SimpleNamespace(
            get_rng_state=_cpu_rng_state, set_rng_state=_set_cpu_rng_state
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


_FACTORIES = (
    "tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "randperm",
    "as_tensor",
)


def _cpu_factory(fn: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        # pin_memory needs an accelerator; the CPU tensor is already in host memory.
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__wrapped__ = fn
    return factory


class CpuTorch(types.ModuleType):
    """A view of ``torch`` for megatron modules: CUDA devices resolve to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


CPU_TORCH = CpuTorch()


_CUR = "torch.cuda.current_device()"

# Every entry: megatron-core 0.16.1 file and the calls it makes that need CUDA.
TORCH_PROXY_MODULES: tuple[ProxyTarget, ...] = (
    ProxyTarget(
        "megatron.core.tensor_parallel.layers",
        (_CUR,),
        "tensor_parallel/layers.py: weight allocation and SP all-gather buffers on current_device",
    ),
    ProxyTarget(
        "megatron.core.tensor_parallel.mappings",
        (_CUR,),
        "tensor_parallel/mappings.py: gather/scatter output buffers on current_device",
    ),
    ProxyTarget(
        "megatron.core.tensor_parallel.random",
        ("torch.cuda.get_rng_state()", "torch.cuda.manual_seed("),
        "tensor_parallel/random.py: RNG tracker and model_parallel_cuda_manual_seed use CUDA RNG",
    ),
    ProxyTarget(
        "megatron.core.utils",
        (_CUR,),
        "utils.py: GlobalMemoryBuffer.get_tensor allocates on current_device (SP buffers)",
    ),
    ProxyTarget(
        "megatron.core.distributed.param_and_grad_buffer",
        (_CUR, 'device="cuda"'),
        "distributed/param_and_grad_buffer.py: DDP param/grad buffers on current_device / 'cuda'",
    ),
    ProxyTarget(
        "megatron.core.distributed.distributed_data_parallel",
        ("torch.cuda.Stream(", "torch.cuda.synchronize()"),
        "distributed/distributed_data_parallel.py: communication stream, synchronize",
    ),
    ProxyTarget(
        "megatron.core.optimizer.optimizer",
        ("device='cuda'", _CUR),
        "optimizer/optimizer.py: found_inf / grad-scale scalars created on 'cuda'",
    ),
    ProxyTarget(
        "megatron.core.optimizer.distrib_optimizer",
        (_CUR,),
        "optimizer/distrib_optimizer.py: state gather buffers on current_device",
    ),
    ProxyTarget(
        "megatron.core.optimizer.clip_grads",
        ("device='cuda'",),
        "optimizer/clip_grads.py: grad-norm and zero-count reductions on 'cuda'",
    ),
    ProxyTarget(
        "megatron.core.pipeline_parallel.schedules",
        ('device="cuda"',),
        "pipeline_parallel/schedules.py: total_num_tokens counter on 'cuda'",
    ),
    ProxyTarget(
        "megatron.core.transformer.moe.router",
        (_CUR,),
        "transformer/moe/router.py: router weights and aux-loss scalars on current_device",
    ),
    ProxyTarget(
        "megatron.core.transformer.moe.experts",
        (_CUR,),
        "transformer/moe/experts.py: GroupedMLP weights on current_device",
    ),
    ProxyTarget(
        "megatron.core.transformer.moe.moe_utils",
        ('device="cuda"',),
        "transformer/moe/moe_utils.py: aux-loss logging tracker on 'cuda'",
    ),
    ProxyTarget(
        "megatron.core.transformer.moe.token_dispatcher",
        ("torch.cuda.Stream()", "torch.cuda.current_stream()"),
        "transformer/moe/token_dispatcher.py: alltoall DtoH side stream and events",
    ),
    ProxyTarget(
        "megatron.core.transformer.moe.shared_experts",
        ("torch.cuda.Stream()",),
        "transformer/moe/shared_experts.py: overlap stream for shared experts",
    ),
    ProxyTarget(
        "megatron.core.transformer.dot_product_attention",
        (_CUR,),
        "transformer/dot_product_attention.py: causal-mask scratch buffer on current_device",
    ),
    ProxyTarget(
        "megatron.core.transformer.utils",
        ('device="cuda"',),
        "transformer/utils.py: get_default_causal_mask builds the mask on 'cuda'",
    ),
    ProxyTarget(
        "megatron.core.transformer.attention",
        (_CUR,),
        "transformer/attention.py: KV scratch buffers on current_device",
    ),
    ProxyTarget(
        "megatron.core.transformer.transformer_layer",
        (_CUR,),
        "transformer/transformer_layer.py: padding/offload tensors on current_device",
    ),
    ProxyTarget(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        (_CUR,),
        "models/common/embeddings/rotary_pos_embedding.py: inv_freq on current_device",
    ),
    ProxyTarget(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        ("torch.cuda.synchronize()",),
        "dist_checkpointing/strategies/filesystem_async.py: synchronize before writing",
    ),
    ProxyTarget(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        ("device='cuda'", _CUR),
        "dist_checkpointing/strategies/state_dict_saver.py: all-reduce flags on 'cuda'",
    ),
    ProxyTarget(
        "megatron.core.dist_checkpointing.strategies.fully_parallel",
        ("torch.cuda.synchronize()",),
        "dist_checkpointing/strategies/fully_parallel.py: synchronize around exchange",
    ),
    ProxyTarget(
        "megatron.core.dist_checkpointing.strategies.async_utils",
        (_CUR, "torch.cuda.synchronize()"),
        "dist_checkpointing/strategies/async_utils.py: liveness flags and synchronize",
    ),
    ProxyTarget(
        "megatron.core.ssm.mamba_mixer",
        (_CUR,),
        "ssm/mamba_mixer.py: conv1d, dt_bias, A_log, D and norm allocated on current_device",
    ),
)


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    """CPU stand-in for tensor_parallel.random._get_cuda_rng_state."""
    return torch.get_rng_state()


def _set_cpu_rng_state_now(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    """CPU stand-in for tensor_parallel.random._set_cuda_rng_state.

    Megatron defers the CUDA version through ``torch.cuda._lazy_call``, which on a machine without
    CUDA queues the callback forever: the RNG tracker's fork() would silently not restore state.
    """
    torch.set_rng_state(new_state)


def _host_split_sizes(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU stand-in for moe_utils.maybe_move_tensor_to_cpu as imported by the token dispatcher.

    The original only converts CUDA tensors (``tensor.is_cuda``); on the CPU the split sizes stay
    tensors, which gloo's all_to_all_single rejects as split-size lists.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _uneven_gather(original: Any) -> Any:
    """mappings._gather_along_first_dim for gloo: its allgather takes equal sizes only.

    Megatron gathers uneven token blocks (``output_split_sizes``) over the expert-TP group in
    the alltoall MoE dispatcher (EP with expert TP > 1). Each rank's block is padded to the
    largest, gathered, and cut back; the result equals NCCL's uneven all_gather.
    """

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        blocks = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(blocks, padded, group=group)
        return torch.cat([b[:n] for b, n in zip(blocks, output_split_sizes, strict=True)])

    gather.__wrapped__ = original
    return gather


def _uneven_reduce_scatter(original: Any) -> Any:
    """mappings._reduce_scatter_along_first_dim for gloo (uneven ``input_split_sizes``, the
    backward of the gather above): all-reduce the whole tensor, keep this rank's rows."""

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(input_split_sizes[: group.rank()])
        return total[start : start + input_split_sizes[group.rank()]].contiguous()

    reduce_scatter.__wrapped__ = original
    return reduce_scatter


# Type strings: 'torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor' / ... -> 'torch.FloatTensor'
_CUDA_TYPE = "'torch.cuda."
_CPU_TYPE = "'torch."

CPU_DEVICE = PatchSet(
    "cpu_device",
    "the device is the CPU (no CUDA, or OMNI_TRAIN_PLATFORM=cpu)",
    proxy=CPU_TORCH,
    proxies=TORCH_PROXY_MODULES,
    attributes=(
        AttributePatch(
            "megatron.core.tensor_parallel.random",
            "_get_cuda_rng_state",
            _get_cpu_rng_state,
            "torch.cuda.random.get_rng_state(device=device)",
            "tensor_parallel/random.py:_get_cuda_rng_state reads the CUDA generator",
        ),
        AttributePatch(
            "megatron.core.tensor_parallel.random",
            "_set_cuda_rng_state",
            _set_cpu_rng_state_now,
            "_lazy_call(cb)",
            "tensor_parallel/random.py:_set_cuda_rng_state defers through torch.cuda._lazy_call",
        ),
        AttributePatch(
            "megatron.core.transformer.moe.token_dispatcher",
            "maybe_move_tensor_to_cpu",
            _host_split_sizes,
            "tensor.is_cuda",
            "transformer/moe/moe_utils.py:maybe_move_tensor_to_cpu keeps CPU split sizes as "
            "tensors",
            needle_module="megatron.core.transformer.moe.moe_utils",
        ),
        # On a GPU host TE's or apex's FusedAdam imports, and megatron would pick it: it steps
        # CUDA tensors only. The CPU takes torch's (AdamW; torch.optim.AdamW subclasses the
        # Adam class the distributed optimizer checks against).
        AttributePatch(
            "megatron.core.optimizer",
            "USING_PYTORCH_OPTIMIZER",
            True,
            "USING_PYTORCH_OPTIMIZER = True",
            "optimizer/__init__.py: TE/apex FusedAdam is chosen whenever it imports",
        ),
        AttributePatch(
            "megatron.core.optimizer.distrib_optimizer",
            "HAVE_APEX_OR_TE",
            False,
            "HAVE_APEX_OR_TE = False",
            "optimizer/distrib_optimizer.py: the fused-Adam state layout whenever TE/apex imports",
        ),
        AttributePatch(
            "megatron.core.optimizer.distrib_optimizer",
            "Adam",
            torch.optim.Adam,
            "from torch.optim import Adam as Adam",
            "optimizer/distrib_optimizer.py: the optimizer class it expects (TE/apex FusedAdam "
            "when they import)",
        ),
    ),
    sources=(
        SourcePatch(
            "megatron.core.optimizer.distrib_optimizer",
            "DistributedOptimizer.sharded_param_state_dp_reshardable",
            "k: torch.empty(",
            "k: torch.zeros(",
            "optimizer/distrib_optimizer.py: the intra-bucket padding written into "
            "dp_reshardable optimizer checkpoints is uninitialised memory; zeros make checkpoint "
            "bytes reproducible, which the resume tests compare bit for bit (harmless on GPU "
            "too; applied with the CPU device, where the tests run)",
        ),
        SourcePatch(
            "megatron.core.optimizer.clip_grads",
            "clip_grad_by_total_norm_fp32",
            _CUDA_TYPE,
            _CPU_TYPE,
            "optimizer/clip_grads.py: assert param.grad.type() == 'torch.cuda.FloatTensor'",
        ),
        SourcePatch(
            "megatron.core.optimizer.distrib_optimizer",
            "DistributedOptimizer._build_model_and_main_param_groups",
            _CUDA_TYPE,
            _CPU_TYPE,
            "optimizer/distrib_optimizer.py: params sorted by type() == 'torch.cuda.*Tensor'",
        ),
        SourcePatch(
            "megatron.core.optimizer.optimizer",
            "Float16OptimizerWithFloat16Params.__init__",
            _CUDA_TYPE,
            _CPU_TYPE,
            "optimizer/optimizer.py: params sorted by type() == 'torch.cuda.*Tensor'",
        ),
    ),
)

GLOO_COLLECTIVES = PatchSet(
    "gloo_collectives",
    "the collective backend is gloo",
    attributes=(
        AttributePatch(
            "megatron.core.tensor_parallel.mappings",
            "_gather_along_first_dim",
            _uneven_gather,
            "torch.distributed.all_gather(output_tensor_list, input_, group=group)",
            "tensor_parallel/mappings.py: uneven all_gather (MoE alltoall dispatcher with "
            "expert TP > 1); gloo's allgather needs equal sizes",
            wraps=True,
        ),
        AttributePatch(
            "megatron.core.tensor_parallel.mappings",
            "_reduce_scatter_along_first_dim",
            _uneven_reduce_scatter,
            "torch.distributed.reduce_scatter(output, input_tensor_list, group=group)",
            "tensor_parallel/mappings.py: uneven reduce_scatter (its backward); gloo needs "
            "equal sizes",
            wraps=True,
        ),
    ),
)

PATCH_SETS = (CPU_DEVICE, GLOO_COLLECTIVES)


def eager_fusions() -> None:
    """Run megatron-core's fused element-wise functions eagerly on the CPU.

    ``megatron.core.jit.jit_fuser`` is ``torch.compile`` on torch >= 2.2 (the bias/activation,
    router and MoE helpers). On the CPU, inductor turns each into C++ in every process: it needs
    a compiler at run time and costs each rank seconds at start-up, for nothing at the sizes a
    CPU trains. Measured on the 2-core machine (2026-12-03): a 4-step 2-rank ``smoke_omni`` run
    27 s instead of 32 s, 100 steps of ``stage=learn`` 64 s instead of 67 s, and the same final
    loss to the last bit in both. The CPU platform never chooses a compiled block of its own
    (attention is ``sdpa`` there, ``flex`` only on CUDA), so dynamo is switched off process-wide.
    """
    import torch._dynamo

    torch._dynamo.config.disable = True
