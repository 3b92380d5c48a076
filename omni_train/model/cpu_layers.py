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


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


class TorchNorm:
    """Stand-in for TENorm: ``torch.nn.RMSNorm`` or ``torch.nn.LayerNorm``, SP-aware."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
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

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        shape = (input_.shape[-1],)
        if self.normalization == "RMSNorm":
            x = F.rms_norm(input_, shape, self.layer_norm_weight, self.eps)
        else:
            x = F.layer_norm(input_, shape, self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return super().forward(x, weight=weight, runtime_gather_output=runtime_gather_output)
