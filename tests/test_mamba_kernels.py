"""CPU Mamba2 kernels (omni_train.platform.kernels.mamba) against naive step-by-step references.

The references below loop over time in float64 and implement the recurrence literally, so
they share no code (and no chunking or masking tricks) with the chunked implementation.
"""

# A, B, C, D are the Mamba2 paper's (and mamba-ssm's) names; lowercasing them hurts reading.
# ruff: noqa: N803, N806

import pytest
import torch
import torch.nn.functional as F

from omni_train.platform.kernels.mamba import (
    TorchGatedRMSNorm,
    causal_conv1d,
    gated_rms_norm,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    ssd_chunk_scan,
)

CHUNK = 16


# --------------------------------------------------------------------------- references
def naive_conv(x, weight, bias, seq_idx=None, activation="silu"):
    """x (b, d, l): out[t] = bias + sum_k w[k] x[t-w+1+k], taps from another sample are 0."""
    x, weight = x.double(), weight.double()
    b, d, seqlen = x.shape
    width = weight.shape[1]
    out = torch.zeros(b, d, seqlen, dtype=torch.float64)
    for t in range(seqlen):
        acc = torch.zeros(b, d, dtype=torch.float64) if bias is None else bias.double().expand(b, d)
        for k in range(width):
            src = t - width + 1 + k
            if src < 0:
                continue
            keep = torch.ones(b, 1, dtype=torch.float64)
            if seq_idx is not None:
                # a tap counts only if no sample boundary lies between src and t
                same = (seq_idx[:, src : t + 1] == seq_idx[:, t : t + 1]).all(dim=1)
                keep = same.double()[:, None]
            acc = acc + keep * weight[:, k] * x[:, :, src]
        out[:, :, t] = acc
    return F.silu(out) if activation in ("silu", "swish") else out


def naive_scan(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, seq_idx=None, final=False
):
    """The Mamba2 recurrence, one time step at a time, state reset at seq_idx changes.
    With ``final`` also the state after the last step, (b, h, p, n)."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, seqlen, h, p = x.shape
    g, n = B.shape[-2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.repeat_interleave(h // g, dim=2)  # (b, l, h, n): head i -> group i // (h // g)
    C = C.repeat_interleave(h // g, dim=2)
    state = torch.zeros(b, h, p, n, dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new = (seq_idx[:, t] != seq_idx[:, t - 1]).double()[:, None, None, None]
            state = state * (1 - new)
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.double().reshape(h, -1) * x
    if z is not None:
        y = y * F.silu(z.double())
    return (y, state) if final else y


def naive_split_scan(
    zxbcdt, conv_w, conv_b, dt_bias, A, D, headdim, ngroups, seq_idx=None, gate=True
):
    """mamba_split_conv1d_scan_combined (no norm / out-proj) from the naive pieces."""
    nheads = A.shape[0]
    dim = nheads * headdim
    dstate = (zxbcdt.shape[-1] - 2 * dim - nheads) // ngroups // 2
    z, xbc, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xbc = naive_conv(xbc.transpose(1, 2), conv_w, conv_b, seq_idx).transpose(1, 2)
    x, B, C = torch.split(xbc, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    b, seqlen = zxbcdt.shape[:2]
    y = naive_scan(
        x.reshape(b, seqlen, nheads, headdim),
        dt,
        A,
        B.reshape(b, seqlen, ngroups, dstate),
        C.reshape(b, seqlen, ngroups, dstate),
        D=D,
        z=z.reshape(b, seqlen, nheads, headdim) if gate else None,
        dt_bias=dt_bias,
        dt_softplus=True,
        seq_idx=seq_idx,
    )
    return y.reshape(b, seqlen, dim)


# --------------------------------------------------------------------------- helpers
def rel_err(got, ref):
    ref = ref.double()
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


def packed_seq_idx(lengths, batch=1):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.to(torch.int32)[None].expand(batch, -1).contiguous()


def scan_inputs(b, seqlen, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    return dict(
        x=r(b, seqlen, h, p),
        dt=r(b, seqlen, h) - 1.0,
        A=-torch.rand(h, generator=gen) * 4 - 0.5,
        B=r(b, seqlen, g, n),
        C=r(b, seqlen, g, n),
        z=r(b, seqlen, h, p),
        dt_bias=r(h) * 0.5,
    )


def split_inputs(seqlen, nheads=4, headdim=8, ngroups=2, dstate=16, width=4, b=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    return dict(
        zxbcdt=r(b, seqlen, 2 * dim + 2 * ngroups * dstate + nheads),
        conv_w=r(conv_dim, width) * 0.5,
        conv_b=r(conv_dim) * 0.1,
        dt_bias=r(nheads) * 0.5 - 1.0,
        A_log=torch.rand(nheads, generator=gen) * 2,
        D=r(nheads),
    )


# Three packed samples: boundaries on a chunk edge (32) and inside chunks (53); all inside one
# chunk (37, 42: a 5-token sample); only on edges; and, for l = 75, a ragged last chunk.
PACKINGS = [[32, 21, 27], [37, 5, 38], [16, 48, 16], [16, 30, 29]]


# --------------------------------------------------------------------------- causal_conv1d
@pytest.mark.parametrize("lengths", [None, *PACKINGS])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_naive(lengths, activation):
    seqlen = 80 if lengths is None else sum(lengths)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, seqlen, generator=gen)
    w, bias = torch.randn(24, 4, generator=gen), torch.randn(24, generator=gen)
    seq_idx = None if lengths is None else packed_seq_idx(lengths, batch=2)
    got = causal_conv1d(x, w, bias, seq_idx=seq_idx, activation=activation)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, naive_conv(x, w, bias, seq_idx, activation)) < 1e-5


def test_causal_conv1d_packed_equals_separate():
    lengths = [37, 5, 38]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 24, sum(lengths), generator=gen)
    w, bias = torch.randn(24, 4, generator=gen), torch.randn(24, generator=gen)
    packed = causal_conv1d(x, w, bias, seq_idx=packed_seq_idx(lengths))
    start = 0
    for length in lengths:
        alone = causal_conv1d(x[:, :, start : start + length], w, bias)
        assert rel_err(packed[:, :, start : start + length], alone) < 1e-5
        start += length
    # without seq_idx the samples do bleed into each other, so the check above has teeth
    assert rel_err(causal_conv1d(x, w, bias)[:, :, 37:42], packed[:, :, 37:42]) > 1e-2


# --------------------------------------------------------------------------- ssd_chunk_scan
@pytest.mark.parametrize("lengths", [None, *PACKINGS])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_ssd_chunk_scan_matches_naive_recurrence(lengths, ngroups):
    seqlen = 80 if lengths is None else sum(lengths)
    inp = scan_inputs(2, seqlen, 4, 8, ngroups, 16)
    seq_idx = None if lengths is None else packed_seq_idx(lengths, batch=2)
    kw = dict(dt_bias=inp["dt_bias"], dt_softplus=True, seq_idx=seq_idx)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    got = ssd_chunk_scan(*args, CHUNK, **kw)
    assert got.shape == inp["x"].shape and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert rel_err(got, naive_scan(*args, **kw)) < 1e-5


@pytest.mark.parametrize("d_shape", ["h", "hp"])
@pytest.mark.parametrize("use_z", [False, True])
@pytest.mark.parametrize("seqlen", [75, 9])  # ragged last chunk; shorter than one chunk
def test_ssd_chunk_scan_with_skip_and_gate(d_shape, use_z, seqlen):
    inp = scan_inputs(2, seqlen, 4, 8, 2, 16, seed=3)
    D = torch.randn(4) if d_shape == "h" else torch.randn(4, 8)
    seq_idx = packed_seq_idx([seqlen // 3, seqlen // 3, seqlen - 2 * (seqlen // 3)], batch=2)
    kw = dict(D=D, z=inp["z"] if use_z else None, dt_bias=inp["dt_bias"], dt_softplus=True)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    for sidx in (None, seq_idx):
        got = ssd_chunk_scan(*args, CHUNK, seq_idx=sidx, **kw)
        assert rel_err(got, naive_scan(*args, seq_idx=sidx, **kw)) < 1e-5


def test_ssd_chunk_scan_raw_dt_and_limit():
    inp = scan_inputs(1, 40, 2, 4, 1, 8, seed=4)
    dt = torch.rand(1, 40, 2) * 0.5  # already positive: no bias, no softplus
    args = [inp["x"], dt, inp["A"], inp["B"], inp["C"]]
    assert rel_err(ssd_chunk_scan(*args, CHUNK), naive_scan(*args)) < 1e-5
    clamped = ssd_chunk_scan(*args, CHUNK, dt_limit=(0.1, 0.3))
    ref = naive_scan(inp["x"], dt.clamp(0.1, 0.3), *args[2:])
    assert rel_err(clamped, ref) < 1e-5


@pytest.mark.parametrize("seqlen", [1, 16, 37])
@pytest.mark.parametrize("limit", [None, (0.05, 0.4)])
def test_mamba_chunk_scan_combined_final_state(seqlen, limit):
    """The inference prefill's stand-in: y and the final state equal the float64 recurrence,
    with and without the dt clamp (the clamp applies to the state as to y)."""
    inp = scan_inputs(2, seqlen, 4, 8, 2, 16, seed=5)
    args = [inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"]]
    extra = {} if limit is None else {"dt_limit": limit}
    y, state = mamba_chunk_scan_combined(
        *args, CHUNK, D=torch.ones(4), dt_bias=inp["dt_bias"], dt_softplus=True,
        return_final_states=True, **extra
    )  # fmt: skip
    dt = F.softplus(inp["dt"] + inp["dt_bias"])
    dt = dt if limit is None else dt.clamp(*limit)
    ref_y, ref_state = naive_scan(inp["x"], dt, *args[2:], D=torch.ones(4), final=True)
    assert state.shape == (2, 4, 8, 16) and state.dtype == torch.float32
    assert rel_err(y, ref_y) < 1e-5
    assert rel_err(state, ref_state) < 1e-5
    plain = mamba_chunk_scan_combined(*args, CHUNK, dt_bias=inp["dt_bias"], dt_softplus=True)
    assert torch.is_tensor(plain)
    with pytest.raises(NotImplementedError):
        mamba_chunk_scan_combined(*args, CHUNK, initial_states=state)


# --------------------------------------------------------------------------- fused entry point
@pytest.mark.parametrize("lengths", [[32, 21, 27], [16, 30, 29]])
def test_split_conv1d_scan_packed_equals_separate(lengths):
    inp = split_inputs(sum(lengths), seed=5)
    A = -torch.exp(inp["A_log"])
    common = (inp["conv_w"], inp["conv_b"], inp["dt_bias"], A, inp["D"], CHUNK)
    kw = dict(headdim=8, ngroups=2)
    packed = mamba_split_conv1d_scan_combined(
        inp["zxbcdt"], *common, seq_idx=packed_seq_idx(lengths), **kw
    )
    assert packed.shape == (1, sum(lengths), 32)
    start = 0
    for length in lengths:
        piece = inp["zxbcdt"][:, start : start + length]
        alone = mamba_split_conv1d_scan_combined(piece, *common, **kw)
        assert rel_err(packed[:, start : start + length], alone) < 1e-5
        start += length
    unpacked = mamba_split_conv1d_scan_combined(inp["zxbcdt"], *common, **kw)
    assert rel_err(unpacked[:, lengths[0] :], packed[:, lengths[0] :]) > 1e-2


@pytest.mark.parametrize("d_has_hdim", [False, True])
def test_split_conv1d_scan_gradients_match_naive(d_has_hdim):
    lengths = [37, 5, 38]
    seq_idx = packed_seq_idx(lengths, batch=2)
    inp = split_inputs(sum(lengths), b=2, seed=6)
    if d_has_hdim:
        inp["D"] = torch.randn(4, 8)
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    leaves64 = {k: v.double().requires_grad_() for k, v in inp.items()}
    probe = torch.randn(2, sum(lengths), 32)

    out = mamba_split_conv1d_scan_combined(
        leaves["zxbcdt"],
        leaves["conv_w"],
        leaves["conv_b"],
        leaves["dt_bias"],
        -torch.exp(leaves["A_log"]),
        leaves["D"],
        CHUNK,
        seq_idx=seq_idx,
        headdim=None if d_has_hdim else 8,
        ngroups=2,
    )
    (out * probe).sum().backward()
    ref = naive_split_scan(
        leaves64["zxbcdt"],
        leaves64["conv_w"],
        leaves64["conv_b"],
        leaves64["dt_bias"],
        -torch.exp(leaves64["A_log"]),
        leaves64["D"],
        headdim=8,
        ngroups=2,
        seq_idx=seq_idx,
    )
    assert rel_err(out, ref) < 1e-5
    (ref * probe.double()).sum().backward()
    for name in ("zxbcdt", "conv_w", "conv_b", "dt_bias", "A_log", "D"):
        grad = leaves[name].grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert rel_err(grad, leaves64[name].grad) < 1e-4, name


def test_split_conv1d_scan_no_gradient_across_samples():
    lengths = [37, 5, 38]
    seq_idx = packed_seq_idx(lengths)
    inp = split_inputs(sum(lengths), seed=7)
    zxbcdt = inp["zxbcdt"].clone().requires_grad_()
    A = -torch.exp(inp["A_log"])
    out = mamba_split_conv1d_scan_combined(
        zxbcdt,
        inp["conv_w"],
        inp["conv_b"],
        inp["dt_bias"],
        A,
        inp["D"],
        CHUNK,
        seq_idx=seq_idx,
        headdim=8,
        ngroups=2,
    )
    bounds = [0, 37, 42, 80]
    for k in range(3):
        (grad,) = torch.autograd.grad(
            out[:, bounds[k] : bounds[k + 1]].sum(), zxbcdt, retain_graph=True
        )
        inside = torch.zeros(80, dtype=torch.bool)
        inside[bounds[k] : bounds[k + 1]] = True
        assert torch.isfinite(grad).all()
        assert (grad[:, ~inside] == 0).all(), f"sample {k} leaks gradient to other samples"
        assert (grad[:, inside].abs().sum(-1) > 0).all()


def test_split_conv1d_scan_rmsnorm_and_outproj():
    """rmsnorm_weight: the scan runs ungated, then gated RMSNorm over all of dim, then linear."""
    inp = split_inputs(40, seed=8)
    A = -torch.exp(inp["A_log"])
    norm_w, proj_w, proj_b = torch.rand(32) + 0.5, torch.randn(12, 32), torch.randn(12)
    z = inp["zxbcdt"][..., :32]
    y_raw = naive_split_scan(
        inp["zxbcdt"], inp["conv_w"], inp["conv_b"], inp["dt_bias"], A, inp["D"], 8, 2, gate=False
    )
    for before in (True, False):
        got = mamba_split_conv1d_scan_combined(
            inp["zxbcdt"],
            inp["conv_w"],
            inp["conv_b"],
            inp["dt_bias"],
            A,
            inp["D"],
            CHUNK,
            headdim=8,
            ngroups=2,
            rmsnorm_weight=norm_w,
            rmsnorm_eps=1e-6,
            outproj_weight=proj_w,
            outproj_bias=proj_b,
            norm_before_gate=before,
        )
        assert got.shape == (1, 40, 12)
        normed = direct_gated_rms_norm(y_raw, norm_w, z, 1e-6, 32, before)
        assert rel_err(got, F.linear(normed, proj_w.double(), proj_b.double())) < 1e-5


def test_split_conv1d_scan_rejects_stateful_calls():
    inp = split_inputs(16)
    args = (inp["zxbcdt"], inp["conv_w"], inp["conv_b"], inp["dt_bias"], -inp["A_log"].exp())
    with pytest.raises(NotImplementedError):
        mamba_split_conv1d_scan_combined(
            *args, inp["D"], CHUNK, headdim=8, ngroups=2, return_final_states=True
        )
    with pytest.raises(ValueError, match="headdim"):
        mamba_split_conv1d_scan_combined(*args, inp["D"], CHUNK, ngroups=2)


# --------------------------------------------------------------------------- gated RMSNorm
def direct_gated_rms_norm(x, w, z, eps, group_size, norm_before_gate):
    x = x.double()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.double())
    pieces = []
    for start in range(0, x.shape[-1], group_size):
        piece = x[..., start : start + group_size]
        pieces.append(piece / torch.sqrt(piece.pow(2).mean(-1, keepdim=True) + eps))
    out = torch.cat(pieces, -1) * w.double()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.double())
    return out


@pytest.mark.parametrize("group_size", [8, 32])
@pytest.mark.parametrize("use_z", [False, True])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_matches_formula(group_size, use_z, norm_before_gate):
    gen = torch.Generator().manual_seed(9)
    x, z = torch.randn(3, 5, 32, generator=gen) * 3, torch.randn(3, 5, 32, generator=gen)
    w = torch.rand(32, generator=gen) + 0.5
    z = z if use_z else None
    got = gated_rms_norm(
        x, w, z=z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate
    )
    ref = direct_gated_rms_norm(x, w, z, 1e-5, group_size, norm_before_gate)
    assert got.dtype == x.dtype and rel_err(got, ref) < 1e-5
    # bf16 in, bf16 out (computed in fp32)
    assert gated_rms_norm(x.bfloat16(), w, z=z, group_size=group_size).dtype == torch.bfloat16


def test_torch_gated_rms_norm_module():
    norm = TorchGatedRMSNorm(32, eps=1e-5, group_size=8, norm_before_gate=False)
    assert list(norm.state_dict().keys()) == ["weight"]
    assert norm.bias is None and torch.equal(norm.weight.data, torch.ones(32))
    x, z = torch.randn(4, 32), torch.randn(4, 32)
    ref = direct_gated_rms_norm(x, torch.ones(32), z, 1e-5, 8, False)
    assert rel_err(norm(x, z), ref) < 1e-5
    assert rel_err(norm(x), direct_gated_rms_norm(x, torch.ones(32), None, 1e-5, 8, False)) < 1e-5


def test_torch_gated_rms_norm_sharded_state_dict(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("needs its own single-process group")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        norm = TorchGatedRMSNorm(32)
        norm.tp_group = dist.group.WORLD
        sharded = norm.sharded_state_dict(
            "decoder.norm.", metadata={"dp_cp_group": dist.group.WORLD}
        )
        assert list(sharded.keys()) == ["decoder.norm.weight"]
        tensor = sharded["decoder.norm.weight"]
        assert tensor.key == "decoder.norm.weight" and tensor.global_shape == (32,)
    finally:
        dist.destroy_process_group()
