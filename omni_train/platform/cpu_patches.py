"""Make megatron-core 0.16.1 run on a CPU-only PyTorch build (gloo backend).

Megatron-core's layer, optimizer, DDP and checkpoint code is device-agnostic except for a set of
CUDA-only calls and a few code paths that only run without Apex/Transformer Engine (which exist
only for CUDA). We patch exactly those, and only when CUDA is absent. Three mechanisms:

1. ``TORCH_PROXY_MODULES``: in each listed megatron module, the module-global name ``torch`` is
   replaced by :class:`CpuTorch`, a proxy that forwards everything to the real ``torch`` except
   ``torch.cuda`` (a CPU stand-in: ``current_device()`` is the CPU, streams/events/synchronize are
   no-ops, the "device RNG" is the CPU generator) and the tensor factories, whose
   ``device="cuda"`` argument is mapped to the CPU. Nothing outside these modules sees the proxy.
2. ``ATTRIBUTE_PATCHES``: attributes replaced by CPU equivalents (RNG state get/set, which
   megatron routes through ``torch.cuda._lazy_call`` that never runs without CUDA; the MoE
   split-size host copy; MambaStack's hard-wired ``TENorm``; the ``te_general_gemm`` name that
   is undefined without TE) or wrapped (the distributed optimizer's ``load_state_dict`` on the
   torch.optim path, which restores AdamW step counts wrongly).
3. ``SOURCE_PATCHES``: functions recompiled with one literal changed (the
   ``x.type() == 'torch.cuda.FloatTensor'`` checks, which cannot be intercepted otherwise, and
   the torch.optim-path ``state_dict`` that asserts on a never-stepped optimizer).

Every patch names the megatron-core location it targets. ``check_patches()`` verifies that each
target still exists and still contains the CUDA-only call it works around; the test suite runs it,
so a megatron-core upgrade that removes or fixes a call fails loudly instead of silently leaving a
dead patch behind.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
import textwrap
import types
from dataclasses import dataclass, field
from typing import Any

import torch

_CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# 1. The torch proxy
# --------------------------------------------------------------------------------------------


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
    kernels (dropout, init) actually draw from. Anything not defined here falls through to the
    real ``torch.cuda`` (``is_available`` and friends answer truthfully).
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


@dataclass(frozen=True)
class ProxyTarget:
    """A megatron module whose global ``torch`` is replaced by :data:`CPU_TORCH`."""

    module: str
    needles: tuple[str, ...]  # CUDA-only source fragments the proxy exists for (staleness check)
    why: str


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


# --------------------------------------------------------------------------------------------
# 2. Attribute patches
# --------------------------------------------------------------------------------------------


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


def _restore_adam_steps(original: Any) -> Any:
    """Wrap DistributedOptimizer.load_state_dict for the torch.optim path (no Apex/TE).

    megatron-core 0.16.1 writes the saved step into every parameter state as one *shared*
    tensor, then the dp_reshardable parameter-state copy overwrites it with the template's 0.
    torch AdamW then restarts bias correction (and, with a shared tensor, advances it once per
    parameter). Afterwards each parameter gets its own step tensor from its group's saved step.
    """

    def load_state_dict(self: Any, state_dict: Any) -> None:
        original(self, state_dict)
        for group in self.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                if param in self.optimizer.state:
                    self.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))

    load_state_dict.__wrapped__ = original
    return load_state_dict


def _cpu_mamba_packing_support(for_inference_not_training: bool = True):
    """CPU stand-in for mamba_mixer._check_mamba_sequence_packing_support: the pure-PyTorch
    training kernels (omni_train.model.cpu_mamba) honour ``seq_idx``; inference is GPU-only."""
    if for_inference_not_training:
        return False, "Mamba inference with packed sequences needs the GPU kernels (mamba-ssm)"
    return True, None


class _CpuTex(types.SimpleNamespace):
    """The one ``transformer_engine_torch`` kernel megatron's Mamba context-parallel path calls
    (``thd_get_partitioned_indices``), as pure PyTorch."""

    @staticmethod
    def thd_get_partitioned_indices(cu_seqlens, total_tokens, world_size, rank):
        from omni_train.parallel.context import thd_partitioned_indices

        return thd_partitioned_indices(cu_seqlens, total_tokens, world_size, rank)


def _cpu_tex_version_ok(version: str, *args: Any, **kwargs: Any) -> bool:
    """mamba_context_parallel asks TE >= 1.10 only for the THD kernel ``_CpuTex`` provides."""
    return True


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


@dataclass(frozen=True)
class AttributePatch:
    module: str
    name: str
    replacement: Any  # the object, or "module:attr" imported when the patch is applied
    needle: str  # source fragment that makes the patch necessary
    why: str
    must_exist: bool = True  # False: the name is *missing* without TE and we define it
    needle_module: str = ""  # where the needle lives, if not in ``module``
    wraps: bool = False  # replacement(original) builds the new attribute


ATTRIBUTE_PATCHES: tuple[AttributePatch, ...] = (
    AttributePatch(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.load_state_dict",
        _restore_adam_steps,
        's["step"] = step',
        "optimizer/distrib_optimizer.py: torch.optim path restores AdamW steps as 0 (and shared)",
        wraps=True,
    ),
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
        "transformer/moe/moe_utils.py:maybe_move_tensor_to_cpu keeps CPU split sizes as tensors",
        needle_module="megatron.core.transformer.moe.moe_utils",
    ),
    AttributePatch(
        "megatron.core.ssm.mamba_block",
        "TENorm",
        "omni_train.model.cpu_layers:TorchNorm",
        "self.final_norm = TENorm(",
        "ssm/mamba_block.py: MambaStack's final norm is hard-wired to TENorm (TE only)",
    ),
    # The Mamba2 mixer: megatron's MambaMixer class runs unchanged; only the mamba-ssm kernels
    # it calls (which exist solely as Triton/CUDA code) become the pure-PyTorch versions.
    AttributePatch(
        "megatron.core.ssm.mamba_mixer",
        "HAVE_MAMBA_SSM",
        True,
        "if not HAVE_MAMBA_SSM:",
        "ssm/mamba_mixer.py: MambaMixer.__init__ raises ImportError without mamba-ssm",
    ),
    AttributePatch(
        "megatron.core.ssm.mamba_mixer",
        "mamba_split_conv1d_scan_combined",
        "omni_train.model.cpu_mamba:mamba_split_conv1d_scan_combined",
        "y = mamba_split_conv1d_scan_combined(",
        "ssm/mamba_mixer.py: the fused conv1d + chunked SSD scan (Triton) of _ssm_training",
        must_exist=False,
    ),
    AttributePatch(
        "megatron.core.ssm.mamba_mixer",
        "ExtendedRMSNorm",
        "omni_train.model.cpu_mamba:TorchGatedRMSNorm",
        "self.norm = ExtendedRMSNorm(",
        "ssm/mamba_mixer.py: the gated RMSNorm subclasses mamba-ssm's Triton RMSNormGated",
    ),
    AttributePatch(
        "megatron.core.ssm.mamba_mixer",
        "_check_mamba_sequence_packing_support",
        _cpu_mamba_packing_support,
        "mamba_ssm >= ",
        "ssm/mamba_mixer.py: packed sequences are gated on mamba-ssm/causal-conv1d versions; "
        "the CPU kernels honour seq_idx",
    ),
    AttributePatch(
        "megatron.core.tensor_parallel.mappings",
        "_gather_along_first_dim",
        _uneven_gather,
        "torch.distributed.all_gather(output_tensor_list, input_, group=group)",
        "tensor_parallel/mappings.py: uneven all_gather (MoE alltoall dispatcher with expert TP "
        "> 1); gloo's allgather needs equal sizes",
        wraps=True,
    ),
    AttributePatch(
        "megatron.core.tensor_parallel.mappings",
        "_reduce_scatter_along_first_dim",
        _uneven_reduce_scatter,
        "torch.distributed.reduce_scatter(output, input_tensor_list, group=group)",
        "tensor_parallel/mappings.py: uneven reduce_scatter (its backward); gloo needs equal sizes",
        wraps=True,
    ),
    AttributePatch(
        "megatron.core.ssm.mamba_context_parallel",
        "tex",
        _CpuTex(),
        "tex.thd_get_partitioned_indices(",
        "ssm/mamba_context_parallel.py: Mamba CP with packed (THD) sequences calls TE's CUDA "
        "kernel thd_get_partitioned_indices",
        must_exist=False,
    ),
    AttributePatch(
        "megatron.core.ssm.mamba_context_parallel",
        "is_te_min_version",
        _cpu_tex_version_ok,
        'assert tex is not None and is_te_min_version("1.10.0")',
        "ssm/mamba_context_parallel.py: the THD path asserts TE >= 1.10 (for that kernel)",
    ),
    AttributePatch(
        "megatron.core.transformer.moe.moe_utils",
        "te_general_gemm",
        None,
        "if te_general_gemm is not None",
        "transformer/moe/moe_utils.py: te_general_gemm is only bound when TE imports (fp32 router)",
        must_exist=False,
    ),
)


# --------------------------------------------------------------------------------------------
# 3. Source patches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePatch:
    module: str
    qualname: str  # "function" or "Class.method"
    old: str  # every occurrence in the function is replaced
    new: str
    why: str


# Type strings: 'torch.cuda.FloatTensor' / 'torch.cuda.BFloat16Tensor' / ... -> 'torch.FloatTensor'
_CUDA_TYPE = "'torch.cuda."
_CPU_TYPE = "'torch."

SOURCE_PATCHES: tuple[SourcePatch, ...] = (
    SourcePatch(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.state_dict",
        'for s in inner_state_dict["state"].values()]))',
        'for s in inner_state_dict["state"].values()])) or [0.0]',
        "optimizer/distrib_optimizer.py: without Apex/TE (the torch.optim path, i.e. always on "
        "CPU) state_dict() asserts one 'step' value, but a never-stepped optimizer has none; "
        "loading a checkpoint builds its state dict on exactly such an optimizer",
    ),
    SourcePatch(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.sharded_param_state_dp_reshardable",
        "k: torch.empty(",
        "k: torch.zeros(",
        "optimizer/distrib_optimizer.py: the intra-bucket padding written into dp_reshardable "
        "optimizer checkpoints is uninitialised memory; zeros make checkpoint bytes "
        "reproducible, which the resume tests compare bit for bit (harmless on GPU too, but we "
        "only patch the CPU platform)",
    ),
    SourcePatch(
        "megatron.core.tensor_parallel.random",
        "CheckpointWithoutOutput.__init__",
        "self.fp8 = fp8 is not None",
        "self.fp8 = fp8 not in (None, False)",
        "tensor_parallel/random.py: CheckpointWithoutOutput() (fp8=False, as TransformerLayer "
        "builds it for 'layernorm' recompute) sets self.fp8 = True and then calls Transformer "
        "Engine's FP8GlobalStateManager, which exists only with TE; on GPU TE answers 'fp8 off'",
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
)


def _owner(module: types.ModuleType, qualname: str) -> tuple[Any, str]:
    """(object that holds the attribute, attribute name) for "name" or "Class.name"."""
    owner: Any = module
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def _resolve(module: types.ModuleType, qualname: str) -> tuple[Any, str, Any]:
    owner, name = _owner(module, qualname)
    return owner, name, inspect.getattr_static(owner, name)


def _recompile(module: types.ModuleType, patch: SourcePatch) -> tuple[Any, str, Any]:
    """Recompile ``patch.qualname`` with ``patch.old`` replaced; return (owner, name, new attr)."""
    owner, name, attr = _resolve(module, patch.qualname)
    wrapper = type(attr) if isinstance(attr, (classmethod, staticmethod)) else None
    fn = attr.__func__ if wrapper else attr
    lines, first_line = inspect.getsourcelines(fn)
    src = textwrap.dedent("".join(lines))
    if patch.old not in src:
        raise RuntimeError(f"stale CPU patch: {patch.old!r} not in {patch.module}.{patch.qualname}")
    src = src.replace(patch.old, patch.new)
    # Blank the decorators (re-applied below) rather than drop them, to keep line numbers.
    src = "\n".join("" if ln.lstrip().startswith("@") else ln for ln in src.splitlines())
    # Wrap in a factory that binds ``__class__`` so zero-argument super() keeps working, and
    # compile against the module's live globals so every other name resolves as in the original.
    # Leading newlines make tracebacks show the original file's line numbers.
    factory_src = (
        "\n" * (first_line - 2)
        + "def _factory(__class__):\n"
        + textwrap.indent(src, "    ")
        + f"\n    return {name}\n"
    )
    namespace: dict[str, Any] = {}
    filename = inspect.getsourcefile(fn) or patch.module
    exec(compile(factory_src, filename, "exec"), vars(module), namespace)
    new_fn = namespace["_factory"](owner)
    new_fn.__qualname__ = fn.__qualname__
    new_fn.__doc__ = fn.__doc__
    return owner, name, wrapper(new_fn) if wrapper else new_fn


# --------------------------------------------------------------------------------------------
# Apply and check
# --------------------------------------------------------------------------------------------


@dataclass
class PatchReport:
    applied: list[str] = field(default_factory=list)


_APPLIED: PatchReport | None = None


def check_patches() -> list[str]:
    """Return a list of problems: targets that are gone or patches that are no longer needed."""
    problems: list[str] = []
    _provide_triton_tensor_ops(PatchReport())  # else ssm.mamba_mixer cannot even be imported
    for t in TORCH_PROXY_MODULES:
        try:
            mod = importlib.import_module(t.module)
        except ImportError as e:
            problems.append(f"{t.module}: module is gone ({e})")
            continue
        src = inspect.getsource(mod)
        if "torch" not in vars(mod):
            problems.append(f"{t.module}: has no module-global 'torch' to proxy")
        missing = [n for n in t.needles if n not in src]
        if missing:
            problems.append(f"{t.module}: no longer contains {missing}; the proxy may be stale")
    for p in ATTRIBUTE_PATCHES:
        mod = importlib.import_module(p.module)
        try:
            owner, name = _owner(mod, p.name)
        except AttributeError:
            problems.append(f"{p.module}.{p.name}: owner is gone")
            continue
        original = _ORIGINALS.get((p.module, p.name), getattr(owner, name, _MISSING))
        if p.must_exist and original is _MISSING:
            problems.append(f"{p.module}.{p.name}: attribute is gone")
            continue
        if not p.must_exist and original is not _MISSING and original is not None:
            problems.append(f"{p.module}.{p.name}: now defined by megatron; patch not needed")
        where = importlib.import_module(p.needle_module) if p.needle_module else mod
        if p.needle not in inspect.getsource(where):
            problems.append(f"{p.module}.{p.name}: {p.needle!r} gone; the patch may be stale")
    for s in SOURCE_PATCHES:
        mod = importlib.import_module(s.module)
        fn = _ORIGINALS.get((s.module, s.qualname))
        if fn is None:
            try:
                fn = _resolve(mod, s.qualname)[2]
            except AttributeError:
                problems.append(f"{s.module}.{s.qualname}: function is gone")
                continue
        if s.old not in inspect.getsource(fn):
            problems.append(f"{s.module}.{s.qualname}: {s.old} gone; patch no longer needed")
    return problems


_MISSING = object()
_ORIGINALS: dict[tuple[str, str], Any] = {}


def _rebind_everywhere(original: Any, replacement: Any) -> list[str]:
    """Point every loaded megatron module's binding of ``original`` at ``replacement``.

    ``from x import f`` copies the binding, so patching ``x.f`` alone would miss the importers.
    """
    rebound = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("megatron.") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, replacement)
                rebound.append(f"{name}.{attr}")
    return rebound


def _provide_triton_tensor_ops(report: PatchReport) -> None:
    """Register the pure-PyTorch tensor ops under megatron's name if its Triton module cannot
    be imported (no triton): ``ssm.mamba_mixer`` imports it at module level."""
    from omni_train.platform import cpu_tensor_ops

    try:
        importlib.import_module(cpu_tensor_ops.MODULE)
    except ImportError:
        sys.modules[cpu_tensor_ops.MODULE] = cpu_tensor_ops
        report.applied.append(f"module {cpu_tensor_ops.MODULE} (pure PyTorch)")


def apply_cpu_patches() -> PatchReport:
    """Apply every patch once (idempotent). Never call this when CUDA is available."""
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    if torch.cuda.is_available():
        raise RuntimeError("CPU patches must not be applied when CUDA is available")
    report = PatchReport()
    _provide_triton_tensor_ops(report)
    # On this platform the "CUDA" RNG that tracker.fork() swaps in *is* the CPU generator, so
    # megatron's check "CPU RNG state changed within GPU RNG context" fires on every random
    # draw inside a fork (e.g. every MambaMixer init) and means nothing here.
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )
    for t in TORCH_PROXY_MODULES:
        mod = importlib.import_module(t.module)
        mod.torch = CPU_TORCH
        report.applied.append(f"proxy {t.module}")
    for p in ATTRIBUTE_PATCHES:
        mod = importlib.import_module(p.module)
        owner, name = _owner(mod, p.name)
        original = getattr(owner, name, _MISSING)
        _ORIGINALS[(p.module, p.name)] = original
        replacement = p.replacement
        if isinstance(replacement, str):
            src_module, _, attr = replacement.partition(":")
            replacement = getattr(importlib.import_module(src_module), attr)
        if p.wraps:
            replacement = replacement(original)
        setattr(owner, name, replacement)
        if owner is mod and callable(original):
            _rebind_everywhere(original, replacement)
        report.applied.append(f"attr {p.module}.{p.name}")
    for s in SOURCE_PATCHES:
        mod = importlib.import_module(s.module)
        owner, name, new_fn = _recompile(mod, s)
        original = inspect.getattr_static(owner, name)
        _ORIGINALS[(s.module, s.qualname)] = original
        setattr(owner, name, new_fn)
        if owner is mod:
            _rebind_everywhere(original, new_fn)
        report.applied.append(f"source {s.module}.{s.qualname}")
    _APPLIED = report
    return report


def patched_modules() -> list[str]:
    """Names of the megatron modules whose ``torch`` is currently the CPU proxy."""
    return [
        t.module
        for t in TORCH_PROXY_MODULES
        if t.module in sys.modules and sys.modules[t.module].torch is CPU_TORCH
    ]
