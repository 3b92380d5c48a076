"""The platform: capability choice for every combination of libraries, the patch sets that
follow (present, needed, applied once, only where chosen), and the pure-PyTorch kernels."""

import dataclasses
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from omni_train.platform import check_patches, patch_sets, registry
from omni_train.platform import device as cpu_device
from omni_train.platform.capabilities import LIBRARY_MODULES, Libraries, choose, probe


def test_every_patch_target_exists_and_is_still_needed():
    """Fails when a megatron-core upgrade removes a patched symbol or fixes the CUDA-only call."""
    assert check_patches() == []


def test_staleness_check_can_fail():
    stale = registry.ProxyTarget(
        "megatron.core.tensor_parallel.layers", ("torch.cuda.no_such_call()",), "test"
    )
    gone = registry.AttributePatch("megatron.core.utils", "no_such_function", None, "x", "t")
    fixed = registry.SourcePatch("megatron.core.utils", "get_model_config", "no such text", "", "")
    problems = registry.check(
        registry.PatchSet("t", "test", proxies=(stale,), attributes=(gone,), sources=(fixed,))
    )
    assert any("no longer contains" in p for p in problems)
    assert any("no_such_function: attribute is gone" in p for p in problems)
    assert any("get_model_config: no such text gone" in p for p in problems)


_FLAGS = [f.name for f in dataclasses.fields(Libraries)]


@pytest.mark.parametrize("forced", ["", "cpu", "cuda"])
def test_every_combination_of_libraries_chooses_runnable_blocks(forced):
    """All 64 combinations of (CUDA, TE, mamba-ssm, Triton, apex, FlexAttention) x the three
    OMNI_TRAIN_PLATFORM values: each block by what is present, each patch set where needed."""
    for values in itertools.product([False, True], repeat=len(_FLAGS)):
        libs = Libraries(**dict(zip(_FLAGS, values, strict=True)))
        if forced == "cuda" and not libs.cuda:
            with pytest.raises(ValueError, match="OMNI_TRAIN_PLATFORM=cuda but torch sees no"):
                choose(libs, forced)
            continue
        p = choose(libs, forced, local_rank=3)
        cuda = libs.cuda and forced != "cpu"
        te = cuda and libs.transformer_engine
        assert p.name == ("cuda" if cuda else "cpu")
        assert p.device == (torch.device("cuda", 3) if cuda else torch.device("cpu"))
        assert p.backend == ("nccl" if cuda else "gloo")
        assert (p.linear, p.experts) == (("te", "te_grouped") if te else ("torch", "sequential"))
        # Never TE attention without TE, never a dense s x s mask on CUDA.
        expected_attention = "te" if te else ("flex" if cuda and libs.flex_attention else "sdpa")
        assert p.attention == expected_attention
        assert p.mamba == ("mamba_ssm" if cuda and libs.mamba_ssm else "torch")
        assert p.fusions == ("compiled" if cuda else "eager")
        fused = cuda and (libs.transformer_engine or libs.apex)
        assert (p.optimizer == "torch_adamw") == (not fused)
        sets = set(p.patch_sets)
        assert ("cpu_device" in sets) == (not cuda) == ("gloo_collectives" in sets)
        assert ("no_transformer_engine" in sets) == (not te)
        assert ("no_mamba_ssm" in sets) == (p.mamba == "torch")
        assert ("torch_optimizer" in sets) == (p.optimizer == "torch_adamw")
        assert set(p.patch_sets) <= set(patch_sets())
        assert p.name in p.describe() and f"attention={p.attention}" in p.describe()


def _run(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_probe_reports_a_library_whose_import_fails_as_absent():
    """Each optional library, its import made to fail (``sys.modules[name] = None``), or made to
    succeed with a stand-in module: the probe follows the import."""
    out = _run(
        f"""
        import sys, types
        from omni_train.platform.capabilities import LIBRARY_MODULES, probe
        for name, module in LIBRARY_MODULES.items():
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                sys.modules[".".join(parts[:i])] = None
            assert getattr(probe(), name) is False, name
            for i in range(1, len(parts) + 1):
                sys.modules[".".join(parts[:i])] = types.ModuleType(".".join(parts[:i]))
            assert getattr(probe(), name) is True, name
        print("ok", sorted(LIBRARY_MODULES) == {sorted(LIBRARY_MODULES)!r})
        """
    )
    assert out.strip() == "ok True"
    libs = probe()  # this machine: the CPU platform's test environment
    assert not libs.cuda and not libs.transformer_engine and not libs.mamba_ssm
    assert set(LIBRARY_MODULES) < {f.name for f in dataclasses.fields(Libraries)}


def test_patches_apply_once_and_only_where_listed():
    out = _run(
        """
        import torch
        from omni_train import platform
        from omni_train.platform import registry
        p = platform.setup()
        assert p.name == "cpu" and p.backend == "gloo" and p.attention == "sdpa", p
        assert p.patch_sets == (
            "cpu_device", "gloo_collectives", "no_transformer_engine", "no_mamba_ssm",
            "torch_optimizer",
        ), p.patch_sets
        first = registry.applied()
        assert set(first) == set(p.patch_sets)
        again = registry.apply(platform.patch_sets()["cpu_device"])
        assert again is first["cpu_device"]  # idempotent
        proxied = [t.module for t in platform.patch_sets()["cpu_device"].proxies]
        assert sorted(platform.patched_modules()) == sorted(proxied)
        import megatron.core.transformer.module as untouched
        assert untouched.torch is torch  # modules not listed keep the real torch
        import megatron.core.optimizer as opt
        assert opt.USING_PYTORCH_OPTIMIZER is True
        print("ok", sum(len(r.applied) for r in first.values()))
        """
    )
    assert out.startswith("ok")


# A GPU host as torch's Python API shows it: a device, and a device RNG torch's own compile
# path saves and restores (dynamo does, whenever CUDA is available).
_FAKE_CUDA = """
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.set_device = lambda device: None
torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
torch.cuda.set_rng_state = lambda state, device="cuda": None
"""


def test_cuda_without_te_or_mamba_ssm_takes_the_pytorch_blocks_and_no_cpu_patches():
    """A CUDA host without Transformer Engine and mamba-ssm (the lent H200): NCCL, flex
    attention, our Mamba kernels and norms, torch AdamW; the CPU device patches stay off."""
    out = _run(
        _FAKE_CUDA
        + """
from omni_train import platform
from omni_train.model.specs import platform_leaves
from omni_train.platform.kernels.attention import FlexDotProductAttention
p = platform.setup()
assert p.name == "cuda" and p.backend == "nccl" and p.attention == "flex", p
assert p.patch_sets == ("no_transformer_engine", "no_mamba_ssm", "torch_optimizer"), p
assert platform.patched_modules() == []
import megatron.core.tensor_parallel.layers as layers
assert layers.torch is torch
import megatron.core.ssm.mamba_mixer as mixer
assert mixer.HAVE_MAMBA_SSM and mixer.mamba_split_conv1d_scan_combined.__module__.endswith(
    "kernels.mamba")
assert platform_leaves(p).core_attention is FlexDotProductAttention
print(p.describe())
""",
        OMNI_TRAIN_PLATFORM="",
    )
    assert "platform cuda: device=cuda:0 collectives=nccl linear=torch attention=flex" in out


def test_forced_cpu_on_a_gpu_host_trains(tmp_path):
    """OMNI_TRAIN_PLATFORM=cpu with CUDA present (faked): the CPU device patches apply (they
    used to refuse), megatron's CUDA view in the patched modules says "no CUDA", and the tiny
    LM trains two steps with megatron's distributed optimizer and writes its checkpoint."""
    out = _run(
        _FAKE_CUDA
        + f"""
from omni_train import platform
from omni_train.platform import device
p = platform.setup()
assert p.name == "cpu" and "cpu_device" in p.patch_sets, p
import torch._dynamo
assert p.fusions == "eager" and torch._dynamo.config.disable
assert device.CPU_TORCH.cuda.is_available() is False
from omni_train.train import main
rc = main(["stage=smoke", "model=tiny", "trainer.train_steps=2", "trainer.eval_iters=0",
           "checkpoint.output_dir={tmp_path}"])
print("rc", rc)
""",
        OMNI_TRAIN_PLATFORM="cpu",  # eager fusions: torch.compile would probe the fake GPU
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    assert out.strip().endswith("rc 0"), out
    assert (tmp_path / "manifest.json").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rng_tracker_fork_restores_the_cpu_generator():
    """megatron's CUDA RNG tracker, mapped onto the CPU generator, forks and restores it."""
    out = _run(
        """
        import torch
        from omni_train import platform
        platform.setup()
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
    assert cpu_device._host_split_sizes(sizes, as_numpy=True).tolist() == [3, 1, 4]
    assert cpu_device._host_split_sizes(sizes) is sizes


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda"), 0, "cuda:1"])
def test_torch_proxy_maps_cuda_devices_to_cpu(device):
    t = cpu_device.CPU_TORCH.zeros(2, device=device, pin_memory=True)
    assert t.device.type == "cpu"
    assert cpu_device.CPU_TORCH.cuda.current_device() == torch.device("cpu")


def test_cpu_rms_norm_is_one_autograd_node_with_exact_gradients():
    """The CPU stand-in for TE's fused RMSNorm: F.rms_norm's values, gradcheck-exact gradients,
    and a single backward node (what keeps selective recompute bit-identical: docs/curriculum.md).
    """
    import torch.nn.functional as F

    from omni_train.platform.kernels.layers import rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    y = rms_norm(x, w, 1e-5)
    assert torch.allclose(y, F.rms_norm(x, (16,), w, 1e-5), rtol=1e-12, atol=1e-12)
    assert [type(f).__name__ for f, _ in y.grad_fn.next_functions] == ["AccumulateGrad"] * 2
    assert rms_norm(x.detach().bfloat16(), w.detach().float(), 1e-5).dtype == torch.bfloat16
