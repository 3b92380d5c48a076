"""The CPU platform's megatron-core patches: present, needed, applied once, never under CUDA."""

import subprocess
import sys
import textwrap

import pytest
import torch

from omni_train.platform import cpu_patches


def test_every_patch_target_exists_and_is_still_needed():
    """Fails when a megatron-core upgrade removes a patched symbol or fixes the CUDA-only call."""
    assert cpu_patches.check_patches() == []


def test_staleness_check_can_fail(monkeypatch):
    stale = cpu_patches.ProxyTarget(
        "megatron.core.tensor_parallel.layers", ("torch.cuda.no_such_call()",), "test"
    )
    gone = cpu_patches.AttributePatch("megatron.core.utils", "no_such_function", None, "x", "t")
    monkeypatch.setattr(cpu_patches, "TORCH_PROXY_MODULES", (stale,))
    monkeypatch.setattr(cpu_patches, "ATTRIBUTE_PATCHES", (gone,))
    problems = cpu_patches.check_patches()
    assert any("no longer contains" in p for p in problems)
    assert any("no_such_function: attribute is gone" in p for p in problems)


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_patches_apply_once_and_only_where_listed():
    out = _run(
        """
        import torch
        from omni_train import platform
        from omni_train.platform import cpu_patches as cp
        p = platform.setup()
        assert p.name == "cpu" and p.backend == "gloo"
        first = cp.apply_cpu_patches()
        assert cp.apply_cpu_patches() is first  # idempotent
        assert sorted(cp.patched_modules()) == sorted(t.module for t in cp.TORCH_PROXY_MODULES)
        import megatron.core.transformer.module as untouched
        assert untouched.torch is torch  # modules not listed keep the real torch
        assert torch.cuda.current_device is not cp.CPU_TORCH.cuda.current_device
        print("ok", len(first.applied))
        """
    )
    assert out.startswith("ok")


def test_nothing_is_patched_when_cuda_is_present():
    out = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True
        torch.cuda.set_device = lambda device: None
        from omni_train import platform
        from omni_train.platform import cpu_patches as cp
        p = platform.setup()
        assert p.name == "cuda" and p.backend == "nccl", p
        import megatron.core.tensor_parallel.layers as layers
        assert layers.torch is torch and cp.patched_modules() == []
        try:
            cp.apply_cpu_patches()
        except RuntimeError as e:
            print("refused:", e)
        """
    )
    assert "refused: CPU patches must not be applied when CUDA is available" in out


def test_rng_tracker_fork_restores_the_cpu_generator():
    """megatron's CUDA RNG tracker, mapped onto the CPU generator, forks and restores it."""
    out = _run(
        """
        import torch
        from omni_train.platform.cpu_patches import apply_cpu_patches
        apply_cpu_patches()
        from megatron.core.tensor_parallel import random as mrandom
        torch.manual_seed(0)
        tracker = mrandom.get_cuda_rng_tracker()
        tracker.add("model-parallel-rng", 123)
        before = torch.get_rng_state()
        with tracker.fork():
            inside = torch.rand(3)
        assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
        with tracker.fork():
            inside2 = torch.rand(3)
        assert not torch.equal(inside, inside2)  # the forked stream advanced
        torch.manual_seed(123)
        assert torch.equal(torch.rand(3), inside)  # and it is the tracked seed's stream
        print("ok")
        """
    )
    assert out.strip().endswith("ok")


def test_split_sizes_become_host_lists():
    sizes = torch.tensor([3, 1, 4])
    assert cpu_patches._host_split_sizes(sizes, as_numpy=True).tolist() == [3, 1, 4]
    assert cpu_patches._host_split_sizes(sizes) is sizes


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda"), 0, "cuda:1"])
def test_torch_proxy_maps_cuda_devices_to_cpu(device):
    t = cpu_patches.CPU_TORCH.zeros(2, device=device, pin_memory=True)
    assert t.device.type == "cpu"
    assert cpu_patches.CPU_TORCH.cuda.current_device() == torch.device("cpu")


def test_cpu_rms_norm_is_one_autograd_node_with_exact_gradients():
    """The CPU stand-in for TE's fused RMSNorm: F.rms_norm's values, gradcheck-exact gradients,
    and a single backward node (what keeps selective recompute bit-identical: docs/curriculum.md).
    """
    import torch.nn.functional as F

    from omni_train.model.cpu_layers import rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    y = rms_norm(x, w, 1e-5)
    assert torch.allclose(y, F.rms_norm(x, (16,), w, 1e-5), rtol=1e-12, atol=1e-12)
    assert [type(f).__name__ for f, _ in y.grad_fn.next_functions] == ["AccumulateGrad"] * 2
    assert rms_norm(x.detach().bfloat16(), w.detach().float(), 1e-5).dtype == torch.bfloat16
