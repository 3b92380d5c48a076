"""megatron-core's Mamba2 mixer with the released model's time-step clamp.

The released Nemotron-H (transformers ``nemotron_h``: ``NemotronHMamba2Mixer``) clamps the
processed time step ``softplus(dt + dt_bias)`` below at ``time_step_min`` (1e-3) in every scan;
megatron-core 0.16.1's ``MambaMixer`` passes no ``dt_limit`` to its scan kernels, so it does not
clamp (about 1e-4 relative logit difference on the released weights). Both kernels we run take
``dt_limit``: mamba-ssm's Triton scans (GPU) and ``omni_train.platform.kernels.mamba`` (CPU, patched
into the same module attribute), so the subclass only adds the keyword; parameters, sharding and
checkpoints are megatron's. ``dt_clamp_min=0`` is megatron's behaviour.

Covered: the training/eval scan (``_ssm_training``) and the prefill scan (``_ssm_prefill``,
the first forward of ``omni-train generate``). Deliberately not covered: megatron's
single-token ``_decode`` step (each generated token after the first), which computes
``softplus`` inline and never clamps. transformers' decode step does not clamp either
(``mamba2_selective_state_update`` gets no ``dt_limit``), so prefill-clamped, decode-unclamped is
what makes greedy generation equal the released model's ``generate``.
"""

from __future__ import annotations

import functools

# Imported after the platform's patches (specs.lm_stack_spec imports this module lazily):
# megatron's mamba_mixer module needs them to import without mamba-ssm/triton.
from megatron.core.ssm import mamba_mixer as _module
from megatron.core.ssm.mamba_mixer import MambaMixer


class ClampedDtMambaMixer(MambaMixer):
    """``MambaMixer`` whose scans clamp the time step to ``[dt_clamp_min, inf)``."""

    def __init__(self, *args, dt_clamp_min: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dt_limit = (float(dt_clamp_min), float("inf"))

    def _with_dt_limit(self, kernel_name: str, method, *args, **kwargs):
        """Run megatron's ``method`` with its module-level kernel bound to ``dt_limit``. The
        kernel is looked up at call time, so platform patches (the CPU kernels) are honoured."""
        kernel = getattr(_module, kernel_name, None)  # absent without mamba-ssm (CPU prefill)
        if self.dt_limit[0] == 0.0 or kernel is None:
            return method(*args, **kwargs)
        setattr(_module, kernel_name, functools.partial(kernel, dt_limit=self.dt_limit))
        try:
            return method(*args, **kwargs)
        finally:
            setattr(_module, kernel_name, kernel)

    def _ssm_training(self, zxbcdt, packed_seq_params=None):
        return self._with_dt_limit(
            "mamba_split_conv1d_scan_combined", super()._ssm_training, zxbcdt, packed_seq_params
        )

    def _ssm_prefill(self, *args, **kwargs):
        return self._with_dt_limit(
            "mamba_chunk_scan_combined", super()._ssm_prefill, *args, **kwargs
        )
