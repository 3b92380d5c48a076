"""The prepared device check (benchmarks/gpu/check.sh runs it): what the GPU platform does on
one GPU, against the CPU reference, in one run of a few minutes.

1. **Platform**: the blocks the platform chooses on this machine (``Platform.describe()``).
2. **Kernels, CPU vs device**: the pure-PyTorch kernels the GPU path uses without TE/mamba-ssm
   (the Mamba2 fused conv + SSD scan, the gated RMSNorm, the fused-in-fp32 RMSNorm, packed
   attention) on the same inputs: forward and gradients on the device against the CPU
   reference in fp32. Attention: FlexAttention (compiled, block-sparse document mask) on the
   device against dense-mask SDPA on the CPU, causal LM and bidirectional ViT masks.
3. **Attention probe**: flex vs dense-mask SDPA on the device, packed sequences of 8k-64k
   tokens in bf16: time per forward+backward and peak memory (ratios in the same run).
4. **Smoke**: the tiny omni model (``stage=smoke_omni_gpu``: packing, bf16, every modality)
   at world size 1 on the device, then 2 steps with ``OMNI_TRAIN_PLATFORM=cpu`` on the same
   host; final loss, step time, tokens/s and peak memory from the run manifests.

Writes ``check.md`` (tables) and ``check.json`` to ``--out``. ``--device cpu`` runs the same
code CPU against CPU (the plumbing test of this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _grads_match(name, fn, inputs, device, tol) -> dict:
    """``fn(*inputs)`` on the CPU and on ``device``: output and input gradients."""
    outs = {}
    for where in ("cpu", device):
        xs = [x.detach().to(where).requires_grad_(x.is_floating_point()) for x in inputs]
        out = fn(*xs)
        g = torch.Generator().manual_seed(7)
        weight = torch.randn(out.shape, generator=g, dtype=out.dtype).to(where)
        (out * weight).sum().backward()
        outs[where] = [out] + [x.grad for x in xs if x.grad is not None]
    worst = max(_max_rel(d, c) for d, c in zip(outs[device], outs["cpu"], strict=True))
    return {"kernel": name, "max_rel_diff": worst, "tol": tol, "ok": worst <= tol}


def check_kernels(device: str) -> list[dict]:
    from omni_train.platform.kernels.layers import rms_norm
    from omni_train.platform.kernels.mamba import gated_rms_norm, mamba_split_conv1d_scan_combined

    g = torch.Generator().manual_seed(0)
    rows = []
    b, seqlen, heads, headdim, groups, dstate = 1, 1024, 8, 32, 2, 64
    dim = heads * headdim
    zxbcdt = torch.randn(b, seqlen, 2 * dim + 2 * groups * dstate + heads, generator=g)
    conv_w = torch.randn(dim + 2 * groups * dstate, 4, generator=g) * 0.3
    conv_b = torch.randn(dim + 2 * groups * dstate, generator=g) * 0.1
    dt_bias = torch.randn(heads, generator=g) * 0.1
    a = -torch.rand(heads, generator=g) * 4 - 0.5
    d = torch.randn(heads, generator=g)
    norm_w = torch.rand(dim, generator=g) + 0.5
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 300, 500, 124]))[None]

    def scan(z, cw, cb, dtb, a_, d_, nw):
        return mamba_split_conv1d_scan_combined(
            z, cw, cb, dtb, a_, d_, chunk_size=128, seq_idx=seq_idx.to(z.device),
            dt_limit=(1e-4, 100.0), activation="silu", rmsnorm_weight=nw, rmsnorm_eps=1e-5,
            headdim=headdim, ngroups=groups, norm_before_gate=False,
        )  # fmt: skip

    rows.append(
        _grads_match(
            "mamba2 conv+SSD scan+gated norm (packed, fp32)",
            scan,
            [zxbcdt, conv_w, conv_b, dt_bias, a, d, norm_w],
            device,
            1e-4,
        )
    )
    x = torch.randn(4096, 512, generator=g)
    z = torch.randn(4096, 512, generator=g)
    w = torch.rand(512, generator=g) + 0.5
    rows.append(
        _grads_match(
            "gated RMSNorm (fp32)",
            lambda x_, z_, w_: gated_rms_norm(x_, w_, z=z_, eps=1e-5, group_size=128),
            [x, z, w],
            device,
            1e-5,
        )
    )
    rows.append(
        _grads_match(
            "RMSNorm, one autograd node (fp32)",
            lambda x_, w_: rms_norm(x_, w_, 1e-5),
            [x, w],
            device,
            1e-5,
        )
    )
    rows += check_attention(device)
    return rows


def _packed(total: int, seed: int) -> torch.Tensor:
    """cu_seqlens of random sample lengths filling ``total`` tokens (int32)."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(16, max(17, total // 4), (1,), generator=g)))
        lengths.append(n)
        left -= n
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def check_attention(device: str) -> list[dict]:
    """Flex (device) vs SDPA (CPU): the megatron core-attention modules on packed THD input."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from omni_train.platform.kernels.attention import (
        FlexDotProductAttention,
        TorchDotProductAttention,
    )

    config = TransformerConfig(
        num_layers=1, hidden_size=256, num_attention_heads=8, num_query_groups=2,
        attention_dropout=0.0,
    )  # fmt: skip
    rows = []
    total = 2048
    cu = _packed(total, 1)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(total, 8, 32, generator=g)
    k = torch.randn(total, 2, 32, generator=g)
    v = torch.randn(total, 2, 32, generator=g)
    for mask, name in ((AttnMaskType.causal, "LM, causal"), (AttnMaskType.no_mask, "ViT, bidir")):
        # The plumbing run (device "cpu") compares SDPA with itself: FlexAttention has no CPU
        # backward.
        modules = {"cpu": TorchDotProductAttention(config, 1, mask, "self")}
        if device != "cpu":
            modules[device] = FlexDotProductAttention(config, 1, mask, "self")

        def attend(q_, k_, v_, _mask=mask, _modules=modules):
            params = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu.to(q_.device),
                cu_seqlens_kv=cu.to(q_.device),
                max_seqlen_q=total,
                max_seqlen_kv=total,
            )
            return _modules[q_.device.type](q_, k_, v_, None, _mask, packed_seq_params=params)

        rows.append(
            _grads_match(
                f"packed attention {name}, flex vs SDPA (fp32)", attend, [q, k, v], device, 1e-4
            )
        )
    return rows


def probe_attention(device: str) -> list[dict]:
    """Time and peak memory of one forward+backward, flex vs dense-mask SDPA, bf16."""
    from omni_train.platform.kernels.attention import DocumentMask, flex_attention

    if device == "cpu":
        return []
    rows = []
    for total in (8192, 32768, 65536):
        cu = _packed(total, total).to(device)
        mask = DocumentMask.build(total, cu, True, device)
        g = torch.Generator(device=device).manual_seed(0)
        shape_q, shape_kv = (1, 32, total, 128), (1, 8, total, 128)
        q, k, v = (
            torch.randn(s, generator=g, device=device, dtype=torch.bfloat16)
            for s in (shape_q, shape_kv, shape_kv)
        )
        for x in (q, k, v):
            x.requires_grad_(True)
        # Each builds its mask per call, as a layer does per step (the dense one is s x s).
        kernels = {
            "flex": lambda q=q, k=k, v=v, m=mask: flex_attention(q, k, v, m, None),
            "sdpa_dense_mask": lambda q=q, k=k, v=v, m=mask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=m.dense(), enable_gqa=True
            ),
        }
        row = {"tokens": total}
        for name, kernel in kernels.items():
            try:
                for _ in range(2):  # compile / warm up
                    kernel().sum().backward()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(5):
                    kernel().sum().backward()
                torch.cuda.synchronize()
                row[f"{name}_ms"] = (time.perf_counter() - start) / 5 * 1e3
                row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                row[f"{name}_ms"] = None
                row[f"{name}_peak_gib"] = "OOM"
            q.grad = k.grad = v.grad = None
            torch.cuda.empty_cache()
        if row.get("sdpa_dense_mask_ms") and row.get("flex_ms"):
            row["speedup"] = row["sdpa_dense_mask_ms"] / row["flex_ms"]
        rows.append(row)
    return rows


def smoke(out: Path, device: str) -> list[dict]:
    """The tiny omni stage at world size 1 on the device, then 2 steps forced onto the CPU."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    synth = out / "synthetic"
    py = [sys.executable, "-m", "omni_train.cli"]
    subprocess.run(
        [*py, "data", "synth", "--out", str(synth), "--samples", "64", "--seed", "0"],
        check=True,
        cwd=ROOT,
        env=env,
    )
    runs = [
        (device, "cuda" if device != "cpu" else "cpu", ["trainer.train_steps=8"]),
        ("cpu (forced on this host)", "cpu", ["trainer.train_steps=2", "trainer.eval_iters=0"]),
    ]
    rows = []
    for i, (label, platform, extra) in enumerate(runs):
        run_dir = out / f"smoke_{i}_{platform}"
        cmd = [
            *py, "run", "--no-plan", "--nproc-per-node", "1", "stage=smoke_omni_gpu",
            "model=tiny", "parallel=single", f"data.synthetic_root={synth}",
            f"checkpoint.output_dir={run_dir}", *extra,
        ]  # fmt: skip
        started = time.time()
        log = out / f"smoke_{i}_{platform}.log"
        with log.open("w") as f:
            rc = subprocess.call(
                cmd, cwd=ROOT, env=dict(env, OMNI_TRAIN_PLATFORM=platform), stdout=f, stderr=f
            )
        row = {"run": label, "rc": rc, "wall_s": time.time() - started}
        manifest = run_dir / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            last = (m.get("metrics") or [{}])[-1]
            row.update(
                platform=m.get("platform"),
                status=m.get("status"),
                steps=m.get("step"),
                first_loss=(m.get("losses") or [None])[0],
                final_loss=m.get("final_loss"),
                step_s=last.get("time/step_s"),
                tokens_per_s=last.get("throughput/tokens_per_s"),
                memory_gib=last.get("memory/gib"),
            )
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--skip-smoke", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("check: no CUDA device; use --device cpu for the plumbing run", file=sys.stderr)
        return 2
    from omni_train.platform import detect

    report: dict = {"platform": detect().describe(), "torch": torch.__version__}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    sections = [("Kernels, device vs CPU", check_kernels(args.device))]
    sections.append(("Attention probe (bf16, fwd+bwd)", probe_attention(args.device)))
    if not args.skip_smoke:
        sections.append(("Tiny omni smoke, world size 1", smoke(args.out, args.device)))
    report["sections"] = {name: rows for name, rows in sections}
    md = [f"# GPU check\n\n{report['platform']}\n\ntorch {report['torch']}"]
    md[0] += f", {report.get('gpu', 'no GPU')}\n"
    md += [f"\n## {name}\n\n{_table(rows)}" for name, rows in sections]
    (args.out / "check.md").write_text("".join(md))
    (args.out / "check.json").write_text(json.dumps(report, indent=1, default=str))
    print("".join(md))
    failed = [r for _, rows in sections for r in rows if r.get("ok") is False or r.get("rc")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
