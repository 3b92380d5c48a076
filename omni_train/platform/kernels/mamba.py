"""Pure-PyTorch CPU equivalents of the Mamba2 kernels megatron's ``MambaMixer`` trains with.

megatron-core's ``MambaMixer._ssm_training`` calls ``mamba_split_conv1d_scan_combined`` from
mamba-ssm, and the mixer's optional gated norm (``ExtendedRMSNorm``) subclasses mamba-ssm's
``RMSNormGated``. Those are Triton kernels (plus the causal-conv1d CUDA extension): they neither
install nor run on a CPU-only machine. This module re-implements the same maths with ordinary
torch ops so megatron's own ``MambaMixer`` runs on CPU with the GPU kernels' semantics:

* ``causal_conv1d``: depthwise causal conv + SiLU, ``causal_conv1d_fn`` incl. ``seq_idx``.
* ``ssd_chunk_scan``: the Mamba2 SSD scan, ``mamba_chunk_scan_combined`` (training path: no
  initial or final states), computed with the chunked algorithm of the Mamba2 paper's
  ``ssd_minimal_discrete`` so it costs a few batched matmuls instead of a loop over time.
* ``mamba_chunk_scan_combined``: the same scan under mamba-ssm's name and signature, with the
  final state (``return_final_states``) that megatron's static-inference prefill stores in the
  cache (``MambaMixer._ssm_prefill``; used by ``omni-train generate``).
* ``mamba_split_conv1d_scan_combined``: the fused split -> conv -> scan -> (norm) -> (out-proj)
  entry point, keyword-compatible with mamba-ssm's.
* ``gated_rms_norm`` / ``TorchGatedRMSNorm``: ``rmsnorm_fn`` and a drop-in for
  ``ExtendedRMSNorm`` with identical parameter names, so checkpoints move between platforms.

Everything is differentiable through plain autograd; internals run in float32 (as the GPU
kernels accumulate) and results come back in the input dtype.

Packed sequences (``seq_idx``): a new sample starts wherever ``seq_idx[t] != seq_idx[t - 1]``.
Neither the convolution nor the scan carries information across such a boundary. For the
monotonically increasing ids megatron builds this is exactly the GPU kernels' rule ("only
positions with equal ``seq_idx`` interact").
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "TorchGatedRMSNorm",
    "causal_conv1d",
    "gated_rms_norm",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "ssd_chunk_scan",
]


def _segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Number the packed samples ``(b, l)`` -> ``(b, l)`` int64, +1 at every id change.

    Comparing these instead of the raw ``seq_idx`` makes "same sample" mean "no boundary in
    between", which lets the chunked scan test a single pair of positions (segment ids are
    non-decreasing) instead of every boundary between them.
    """
    change = seq_idx[:, 1:] != seq_idx[:, :-1]
    seg = torch.zeros(seq_idx.shape, dtype=torch.int64, device=seq_idx.device)
    seg[:, 1:] = torch.cumsum(change.to(torch.int64), dim=1)
    return seg


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Depthwise causal 1-D convolution, the CPU twin of ``causal_conv1d_fn``.

    Args:
        x: ``(b, d, l)`` input.
        weight: ``(d, w)`` per-channel taps; ``out[t] = sum_k weight[:, k] * x[t - w + 1 + k]``.
        bias: ``(d,)`` or None.
        seq_idx: ``(b, l)`` integer sample ids of a packed batch, or None. Taps reaching into a
            different sample contribute zero, as if each sample were zero-padded on the left.
        activation: ``"silu"``/``"swish"`` applies SiLU; None (or anything else) applies none.

    Returns:
        ``(b, d, l)`` in ``x.dtype``.
    """
    _, d, seqlen = x.shape
    width = weight.shape[-1]
    if weight.shape != (d, width):
        raise ValueError(f"weight must be (d={d}, w), got {tuple(weight.shape)}")
    xf = F.pad(x.float(), (width - 1, 0))
    wf = weight.float()
    seg = None
    if seq_idx is not None:
        # Left padding belongs to no sample (-1), so it is masked like a foreign sample.
        seg = F.pad(_segment_ids(seq_idx), (width - 1, 0), value=-1)
        seg_t = seg[:, width - 1 :]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    # A loop over the (tiny, usually 4) taps, not over time: each step is one shifted
    # multiply-add over the whole tensor, and masking a tap is a single torch.where.
    for k in range(width):
        tap = xf[:, :, k : k + seqlen]
        if seg is not None:
            same = (seg[:, k : k + seqlen] == seg_t).unsqueeze(1)
            tap = torch.where(same, tap, 0.0)
        out = out + wf[:, k, None] * tap
    if bias is not None:
        out = out + bias.float()[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    return out.to(x.dtype)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """Pairwise partial sums ``(..., T)`` -> ``(..., T, T)``: ``out[t, s] = sum a[s+1 .. t]``.

    Built from a masked cumsum rather than ``cumsum[t] - cumsum[s]`` so each entry is a direct
    sum of the terms it covers (no cancellation between two large running totals). Entries
    with ``s > t`` are meaningless (0 here) and must be masked by the caller.
    """
    length = a.shape[-1]
    a = a[..., None].expand(*a.shape, length)  # [..., t, s] = a[t]
    strictly_lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    return torch.cumsum(torch.where(strictly_lower, a, 0.0), dim=-2)


def _masked_exp(arg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(arg)`` where ``mask`` holds, exactly 0 elsewhere, with clean gradients.

    The masked-out ``arg`` entries are replaced *before* the exp, so an entry that would
    overflow never produces ``inf`` (and ``0 * inf = NaN`` in the backward pass).
    """
    return torch.where(mask, torch.exp(torch.where(mask, arg, 0.0)), 0.0)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,  # noqa: N803 - mamba-ssm's argument names
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    chunk_size: int,
    D: torch.Tensor | None = None,  # noqa: N803
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """Mamba2 SSD scan with the semantics of ``mamba_chunk_scan_combined`` (training path).

    Per head, with ``state`` of shape ``(p, n)``::

        dt_t    = clamp(softplus(dt_t + dt_bias), *dt_limit)   # bias/softplus if requested
        state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)
        y_t     = state_t @ C_t + D * x_t;   y_t *= silu(z_t) if z is given

    The state is zero before the first token and at the first token of every new packed
    sample (``seq_idx`` change).

    Args:
        x: ``(b, l, h, p)`` inputs.
        dt: ``(b, l, h)`` raw time steps.
        A: ``(h,)`` decay rates (negative).
        B: ``(b, l, g, n)`` input projections; head ``i`` uses group ``i // (h // g)``.
        C: ``(b, l, g, n)`` output projections.
        chunk_size: block length of the chunked algorithm; ``l`` need not be a multiple.
        D: ``(h,)`` or ``(h, p)`` skip connection, or None.
        z: ``(b, l, h, p)`` gate, or None.
        dt_bias: ``(h,)`` added to ``dt`` before the softplus, or None.
        dt_softplus: apply softplus to ``dt``.
        seq_idx: ``(b, l)`` integer sample ids of a packed batch, or None.
        dt_limit: ``(min, max)`` clamp of the processed ``dt``; the default is a no-op.

    Returns:
        ``(b, l, h, p)`` in ``x.dtype`` (computed in float32).
    """
    y, _ = _ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, seq_idx, dt_limit)
    return y


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,  # noqa: N803 - mamba-ssm's argument names
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    chunk_size: int,
    D: torch.Tensor | None = None,  # noqa: N803
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    **unused: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CPU drop-in for ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``.

    megatron's static-inference prefill (``MambaMixer._ssm_prefill``) calls it with
    ``return_final_states=True`` and stores the final state in the inference cache; decode
    steps then continue from it. Shapes as ``ssd_chunk_scan``.

    Returns:
        ``y`` ``(b, l, h, p)`` in ``x.dtype``, and with ``return_final_states`` also the state
        after the last token, ``(b, h, p, n)`` float32 (of the last packed sample if
        ``seq_idx`` is given, as the kernel).

    Raises:
        NotImplementedError: for ``initial_states``, ``cu_seqlens`` or
            ``return_varlen_states``: only the dynamic (chunked, paged) inference path of
            megatron passes them, and omni-train does not use it.
    """
    if initial_states is not None or cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError(
            "the CPU mamba_chunk_scan_combined covers the static, unpacked prefill only "
            "(no initial_states / cu_seqlens / return_varlen_states)"
        )
    y, state = _ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, seq_idx, dt_limit)
    return (y, state) if return_final_states else y


def _ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,  # noqa: N803 - mamba-ssm's argument names
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    chunk_size: int,
    D: torch.Tensor | None = None,  # noqa: N803
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ssd_chunk_scan`` returning ``(y (b, l, h, p), final_state (b, h, p, n) fp32)``."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[-2:]
    if nheads % ngroups:
        raise ValueError(f"nheads={nheads} is not a multiple of ngroups={ngroups}")
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        raise ValueError("dt must be (b, l, h) and A must be (h,)")
    if B.shape != (batch, seqlen, ngroups, dstate) or C.shape != B.shape:
        raise ValueError("B and C must both be (b, l, g, n)")
    heads_per_group = nheads // ngroups

    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)  # threshold 20 (linear above), as the Triton kernel
    if dt_limit != (0.0, float("inf")):
        dtf = dtf.clamp(min=dt_limit[0], max=dt_limit[1])

    # Pad time to whole chunks with dt = 0 (after the softplus): the padded steps then neither
    # decay nor feed the state, and being at the end they cannot reach real outputs anyway.
    pad = (-seqlen) % chunk_size
    xf = F.pad(x.float(), (0, 0, 0, 0, 0, pad))
    dtf = F.pad(dtf, (0, 0, 0, pad))
    bf = F.pad(B.float(), (0, 0, 0, 0, 0, pad))
    cf = F.pad(C.float(), (0, 0, 0, 0, 0, pad))
    nchunks = (seqlen + pad) // chunk_size

    # Heads are split as (g, r) so B/C stay per group and broadcast over the r heads that
    # share them, instead of materialising h copies.
    xc = rearrange(xf, "b (c t) (g r) p -> b c g r t p", t=chunk_size, g=ngroups)
    dtc = rearrange(dtf, "b (c t) (g r) -> b c g r t", t=chunk_size, g=ngroups)
    bc = rearrange(bf, "b (c t) g n -> b c g t n", t=chunk_size)
    cc = rearrange(cf, "b (c t) g n -> b c g t n", t=chunk_size)
    da = dtc * A.float().view(ngroups, heads_per_group, 1)  # (b, c, g, r, t)
    da_cs = torch.cumsum(da, dim=-1)  # within-chunk log-decay from chunk start

    seg = None
    if seq_idx is not None:
        seg = _segment_ids(seq_idx)
        seg = torch.cat([seg, seg[:, -1:].expand(-1, pad)], dim=1)  # padding: last sample
        seg = rearrange(seg, "b (c t) -> b c t", t=chunk_size)

    # 1. Intra-chunk (diagonal blocks): y[t] += sum_{s<=t} (C_t.B_s) exp(sum da[s+1..t]) dt_s x_s
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    mask = causal
    if seg is not None:
        same = seg[:, :, :, None] == seg[:, :, None, :]  # (b, c, t, s)
        mask = (causal & same)[:, :, None, None]
    decay = _masked_exp(_segsum(da), mask)  # (b, c, g, r, t, s)
    cb = torch.einsum("bcgtn,bcgsn->bcgts", cc, bc)
    weights = cb[:, :, :, None] * decay * dtc[..., None, :]
    y = weights @ xc  # (b, c, g, r, t, p)

    # 2. Each chunk's own contribution to the state at its last position. Tokens from a
    #    sample that ends inside the chunk are dropped: they can never reach a later chunk.
    #    The log-decay from s to the chunk end, sum da[s+1 ..], is a reverse cumsum rather than
    #    da_cs[-1] - da_cs[s]: the difference cancels only up to rounding, so its gradient
    #    would leak ~1e-10 into earlier samples of the chunk; the direct sum never touches them.
    after = F.pad(da[..., 1:], (0, 1))  # after[s] = da[s + 1]
    to_end = torch.exp(torch.cumsum(after.flip(-1), dim=-1).flip(-1)) * dtc  # (b, c, g, r, t)
    if seg is not None:
        to_end = torch.where((seg == seg[..., -1:])[:, :, None, None], to_end, 0.0)
    chunk_states = (to_end[..., None] * xc).transpose(-1, -2) @ bc[:, :, :, None]
    # chunk_states: (b, c, g, r, p, n)

    # 3. Inter-chunk state passing: end-state of chunk i = sum_{j<=i} exp(total decay of
    #    chunks j+1..i) * chunk_states[j], kept only if no sample boundary lies in between.
    #    This is a small c x c quadratic form rather than a loop over chunks.
    # Inter-chunk state passing as a recurrence over chunks (linear in their number; the
    # quadratic all-pairs form of ssd_minimal dominates the run time at long contexts on CPU):
    # end_state[c] = chunk_state[c] + exp(total decay of c) * end_state[c - 1], where a packed
    # sample boundary inside chunk c cuts the carried state off.
    carry = torch.exp(da_cs[..., -1])  # (b, c, g, r)
    if seg is not None:
        end_seg = seg[..., -1]  # (b, c)
        same = F.pad(end_seg[:, 1:] == end_seg[:, :-1], (1, 0), value=False)
        carry = torch.where(same[:, :, None, None], carry, 0.0)
    state = torch.zeros_like(chunk_states[:, 0])  # (b, g, r, p, n)
    starts = []
    for c in range(nchunks):
        starts.append(state)
        state = chunk_states[:, c] + carry[:, c, :, :, None, None] * state
    start_states = torch.stack(starts, dim=1)  # (b, c, g, r, p, n)

    # 4. Inter-chunk output (off-diagonal blocks): y[t] += exp(da_cs[t]) * C_t . start_state,
    #    only for tokens still in the sample that was running when the chunk began.
    from_start = torch.exp(da_cs)  # (b, c, g, r, t); exponent <= 0
    if seg is not None:
        prev_end = F.pad(seg[:, :-1, -1], (1, 0), value=-1)  # (b, c); chunk 0 has no state
        running = (seg == prev_end[..., None])[:, :, None, None]
        from_start = torch.where(running, from_start, 0.0)
    y = y + (cc[:, :, :, None] @ start_states.transpose(-1, -2)) * from_start[..., None]

    y = rearrange(y, "b c g r t p -> b (c t) (g r) p")[:, :seqlen]
    xf = xf[:, :seqlen]
    if D is not None:
        d_skip = D.float().view(nheads, -1)  # (h, 1) or (h, p): broadcasts either way
        y = y + d_skip * xf
    if z is not None:
        y = y * F.silu(z.float())
    # After the loop ``state`` is the state at the last (padded) position; padded steps have
    # dt = 0, so they neither decay nor feed it: it is the state after the last real token.
    return y.to(x.dtype), rearrange(state, "b g r p n -> b (g r) p n")


def gated_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated RMSNorm with the semantics of mamba-ssm's ``layernorm_gated.rmsnorm_fn``.

    ``out = rmsnorm_groups(x * silu(z)) * weight`` (gate first) or
    ``out = rmsnorm_groups(x) * weight * silu(z)`` (``norm_before_gate``). Without ``z`` it is a
    plain RMSNorm.

    Args:
        x: ``(..., d)``.
        weight: ``(d,)``.
        z: ``(..., d)`` gate, or None.
        eps: added to the mean square.
        group_size: each contiguous block of ``group_size`` channels is normalised on its own
            (megatron uses one group per SSM group so TP sharding does not change the result);
            None normalises the whole last dim.
        norm_before_gate: gate after (True) or before (False) normalising.

    Returns:
        ``(..., d)`` in ``x.dtype`` (computed in float32).
    """
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    if dim % group_size:
        raise ValueError(f"last dim {dim} is not a multiple of group_size={group_size}")
    xf = x.float()
    gate = F.silu(z.float()) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    xg = xf.unflatten(-1, (dim // group_size, group_size))
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).flatten(-2) * weight.float()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,  # noqa: N803 - mamba-ssm's argument names
    D: torch.Tensor,  # noqa: N803
    chunk_size: int,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    activation: str = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    **unused: Any,
) -> torch.Tensor:
    """CPU drop-in for ``mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined``.

    Follows mamba-ssm's reference ``mamba_split_conv1d_scan_ref``: split ``zxbcdt`` into
    ``z | xBC | dt``, causal-conv + SiLU over ``xBC`` (respecting ``seq_idx``), split ``x | B |
    C``, run the SSD scan with ``dt_bias`` and softplus, then either gate with ``silu(z)`` or,
    given ``rmsnorm_weight``, apply the gated RMSNorm over the whole ``dim``; finally the
    optional output projection.

    Args:
        zxbcdt: ``(b, l, 2*dim + 2*ngroups*dstate + nheads)``.
        conv1d_weight: ``(dim + 2*ngroups*dstate, w)``.
        conv1d_bias: ``(dim + 2*ngroups*dstate,)`` or None.
        dt_bias: ``(nheads,)``.
        A: ``(nheads,)``, negative.
        D: ``(nheads,)`` (then ``headdim`` is required) or ``(nheads, headdim)``.
        chunk_size: SSD chunk length.
        seq_idx: ``(b, l)`` integer sample ids of a packed batch, or None.
        dt_limit: ``(min, max)`` clamp of ``softplus(dt + dt_bias)``.
        activation: conv activation (``"silu"``/``"swish"``).
        rmsnorm_weight: ``(dim,)`` or None.
        rmsnorm_eps: RMSNorm epsilon.
        outproj_weight: ``(d_out, dim)`` or None; ``outproj_bias``: ``(d_out,)`` or None.
        headdim: head size when ``D`` is 1-D.
        ngroups: number of B/C groups.
        norm_before_gate: for the gated RMSNorm.
        **unused: other mamba-ssm keywords; stateful ones (``initial_states``,
            ``return_final_states``) are rejected since this is the training path only.

    Returns:
        ``(b, l, dim)``, or ``(b, l, d_out)`` with ``outproj_weight``; dtype of ``zxbcdt``
        (or of the projection).
    """
    if unused.get("initial_states") is not None or unused.get("return_final_states"):
        raise NotImplementedError(
            "kernels.mamba.mamba_split_conv1d_scan_combined supports the training path only "
            "(no initial_states / return_final_states)"
        )
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is required when D has shape (nheads,)")
        nheads = D.shape[0]
    else:
        nheads, headdim = D.shape
    if nheads % ngroups:
        raise ValueError(f"nheads={nheads} is not a multiple of ngroups={ngroups}")
    batch, seqlen, proj = zxbcdt.shape
    dim = nheads * headdim
    dstate = (proj - 2 * dim - nheads) // ngroups // 2
    if proj != 2 * dim + 2 * ngroups * dstate + nheads or dstate <= 0:
        raise ValueError(
            f"zxbcdt last dim {proj} does not match nheads={nheads}, "
            f"headdim={headdim}, ngroups={ngroups}"
        )
    if dt_bias.shape != (nheads,) or A.shape != (nheads,):
        raise ValueError("dt_bias and A must have shape (nheads,)")
    if not (math.isfinite(dt_limit[0]) and dt_limit[1] > dt_limit[0]):
        raise ValueError(f"invalid dt_limit {dt_limit}")

    z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xbc = causal_conv1d(
        xbc.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation
    ).transpose(1, 2)
    x, b_proj, c_proj = torch.split(xbc, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    x = rearrange(x, "b l (h p) -> b l h p", h=nheads)
    b_proj = rearrange(b_proj, "b l (g n) -> b l g n", g=ngroups)
    c_proj = rearrange(c_proj, "b l (g n) -> b l g n", g=ngroups)
    z = rearrange(z, "b l (h p) -> b l h p", h=nheads)
    out = ssd_chunk_scan(
        x,
        dt,
        A,
        b_proj,
        c_proj,
        chunk_size,
        D=D,
        z=z if rmsnorm_weight is None else None,
        dt_bias=dt_bias,
        dt_softplus=True,
        seq_idx=seq_idx,
        dt_limit=dt_limit,
    )
    out = rearrange(out, "b l h p -> b l (h p)")
    if rmsnorm_weight is not None:
        out = gated_rms_norm(
            out,
            rmsnorm_weight,
            z=rearrange(z, "b l h p -> b l (h p)"),
            eps=rmsnorm_eps,
            norm_before_gate=norm_before_gate,
        )
    if outproj_weight is not None:
        out = F.linear(out, outproj_weight, outproj_bias)
    return out


class TorchGatedRMSNorm(torch.nn.Module):
    """CPU drop-in for megatron's ``ExtendedRMSNorm`` (mamba-ssm ``RMSNormGated`` + sharding).

    Same constructor, parameter (``weight``, ``(hidden_size,)``, ones) and ``bias`` registered
    as None, so its ``state_dict`` is exactly ``{"weight"}`` like the GPU module's and
    checkpoints load on either platform. ``forward(x (..., hidden), z (..., hidden) | None)``
    returns ``(..., hidden)`` in ``x.dtype``.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(
            x,
            self.weight,
            z=z,
            eps=self.eps,
            group_size=self.group_size,
            norm_before_gate=self.norm_before_gate,
        )

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Shard ``weight`` along axis 0 over TP, as ``ExtendedRMSNorm`` does."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        if not hasattr(self, "tp_group"):
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
