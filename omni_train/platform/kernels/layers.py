"""Pure-PyTorch stand-ins for the Transformer Engine layers the GPU specs use.

They keep TE's parameter names and shapes (``weight``; ``layer_norm_weight`` on the fused
norm+linear) so one checkpoint serves both platforms, and they mark norm parameters with
``sequence_parallel`` so megatron all-reduces their gradients over the TP group under SP
(megatron's own torch norm refuses SP outright).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer import TransformerConfig


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays


class _FusedRMSNorm(torch.autograd.Function):
    """RMSNorm with one backward node, computed in fp32 like TE's fused kernel.

    Why not ``F.rms_norm``: on CPU it decomposes into ops that use the input twice, so the
    input's gradient is a sum of several autograd contributions whose order depends on where a
    recompute boundary falls (megatron's selective ``mlp``/``layernorm`` recompute put the
    residual outside and the norm inside the checkpoint). Float addition is not associative, so
    recompute on vs off differed in the last bits. With a single node the input gets one
    contribution from the norm and one from the residual; that sum is commutative, and recompute
    stays bit-identical. x ``[..., h]``, weight ``[h]`` -> ``[..., h]`` in x's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(_compute_dtype(x))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * weight.to(x32.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32, g32 = x.to(rstd.dtype), grad.to(rstd.dtype)
        xhat = x32 * rstd
        gw = g32 * weight.to(rstd.dtype)
        # d/dx [x * rstd] = rstd * (g - xhat * mean(g * xhat))
        grad_x = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        grad_w = (g32 * xhat).reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim; see ``_FusedRMSNorm`` for why not F.rms_norm."""
    return _FusedRMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameter ``weight``) running the fused function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


class TorchNorm:
    """Stand-in for TENorm: ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm``, SP-aware."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        if config.normalization == "RMSNorm":
            norm = _RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        _mark_sequence_parallel(norm, config)
        return norm


class TorchNormColumnParallelLinear(ColumnParallelLinear):
    """Stand-in for TELayerNormColumnParallelLinear: norm, then a column-parallel linear.

    Input ``[s/tp (SP) or s, b, h]``; the norm runs on the local sequence shard before the
    linear's SP all-gather, as TE does. Output ``[s, b, out/tp]``.
    """

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.normalization = config.normalization
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype)
        )
        self.layer_norm_weight.sequence_parallel = config.sequence_parallel
        if self.normalization == "LayerNorm":
            self.layer_norm_bias = torch.nn.Parameter(
                torch.zeros(input_size, dtype=config.params_dtype)
            )
            self.layer_norm_bias.sequence_parallel = config.sequence_parallel
        else:
            self.register_parameter("layer_norm_bias", None)

    def normalize(self, input_: torch.Tensor) -> torch.Tensor:
        """The fused norm alone (``[.., h]`` -> ``[.., h]``): what the linear reads, and what
        a LoRA adapter beside it reads too."""
        if self.normalization == "RMSNorm":
            return rms_norm(input_, self.layer_norm_weight, self.eps)
        shape = (input_.shape[-1],)
        return F.layer_norm(input_, shape, self.layer_norm_weight, self.layer_norm_bias, self.eps)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        x = self.normalize(input_)
        return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)
