"""Checkpoints move between the PyTorch layers (CPU, CUDA without TE) and the Transformer
Engine layout, whose layers carry an ``_extra_state`` object each (FP8 metadata).

No Transformer Engine here: the "TE layout" model is our model with the same leaves plus TE's
extra-state hooks, which megatron's sharded_state_dict turns into ``*._extra_state`` objects
exactly as for TE layers. megatron's own parallel linears already save an (empty) extra state
for TE compatibility; the core attention is where the layouts differ: TE's has FP8 metadata,
the PyTorch attention has none. (TE's grouped-GEMM experts save SequentialMLP's keys: megatron
keeps those interchangeable itself.)"""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel.layers import RowParallelLinear
from torch.distributed.checkpoint.api import CheckpointException

from omni_train.checkpoint.io import load_component_weights, load_weights
from omni_train.config import compose_job
from omni_train.model.build import build_omni_model
from omni_train.model.specs import Leaves, platform_leaves
from omni_train.parallel.state import local_world
from omni_train.platform import setup
from omni_train.platform.kernels.attention import TorchDotProductAttention
from omni_train.platform.kernels.layers import TorchNorm, TorchNormColumnParallelLinear


class _ExtraState:
    """TE's contract: ``get_extra_state`` (a uint8 tensor of serialised FP8 metadata)."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([1, 2, 3], dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.extra_state_loaded = state


class _TENormLinear(_ExtraState, TorchNormColumnParallelLinear):
    pass


class _TERowLinear(_ExtraState, RowParallelLinear):
    pass


class _TEAttention(_ExtraState, TorchDotProductAttention):
    pass


_TE_LAYOUT = Leaves(_TENormLinear, _TERowLinear, TorchNorm, _TEAttention, False)


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}


@pytest.fixture(scope="module")
def world():
    cfg = compose_job(["stage=smoke_omni", "model=tiny"])
    platform = setup()
    with local_world(cfg.parallel, platform, 0) as ps:
        yield cfg, ps, platform


def _build(world, leaves, seed):
    cfg, ps, platform = world
    cfg.trainer.seed = seed
    torch.manual_seed(seed)
    return build_omni_model(cfg, ps, platform, leaves)[0]


def test_te_layout_checkpoint_loads_into_the_pytorch_layers_and_back(world, tmp_path):
    _, _, platform = world
    te_model = _build(world, _TE_LAYOUT, seed=1)
    sharded = te_model.sharded_state_dict()
    (tmp_path / "te").mkdir()
    dist_checkpointing.save({"model": sharded}, str(tmp_path / "te"))

    torch_model = _build(world, platform_leaves(platform), seed=2)
    only_te = set(sharded) - set(torch_model.sharded_state_dict())
    assert only_te and all(k.endswith("core_attention._extra_state") for k in only_te)
    assert len(only_te) == 3  # the LM's attention layer and the tiny ViT's two
    before = _params(torch_model)
    load_weights(tmp_path / "te", torch_model)  # TE -> PyTorch: extra state ignored
    after = _params(torch_model)
    assert after.keys() == _params(te_model).keys()
    assert all(torch.equal(after[k], v) for k, v in _params(te_model).items())
    assert any(not torch.equal(before[k], after[k]) for k in before)

    (tmp_path / "pt").mkdir()
    dist_checkpointing.save({"model": torch_model.sharded_state_dict()}, str(tmp_path / "pt"))
    fresh_te = _build(world, _TE_LAYOUT, seed=3)
    load_weights(tmp_path / "pt", fresh_te)  # PyTorch -> TE: extra state stays as initialised
    assert all(torch.equal(v, _params(torch_model)[k]) for k, v in _params(fresh_te).items())
    attention = [m for m in fresh_te.modules() if isinstance(m, _TEAttention)]
    assert len(attention) == 3 and not any(hasattr(m, "extra_state_loaded") for m in attention)

    load_component_weights(tmp_path / "pt", fresh_te, "vision_projector")  # per component too
    load_weights(tmp_path / "te", fresh_te)  # TE -> TE: extra state restored
    assert all(torch.equal(m.extra_state_loaded, m.get_extra_state()) for m in attention)


def test_a_missing_parameter_still_fails(world, tmp_path):
    """Only extra state may be absent: a checkpoint that lacks a weight is refused."""
    _, _, platform = world
    model = _build(world, platform_leaves(platform), seed=1)
    sharded = model.sharded_state_dict()
    dropped = next(k for k in sharded if k.startswith("vision_projector.") and "fc2.weight" in k)
    del sharded[dropped]
    (tmp_path / "partial").mkdir()
    dist_checkpointing.save({"model": sharded}, str(tmp_path / "partial"))
    with pytest.raises(CheckpointException) as refused:
        load_weights(tmp_path / "partial", _build(world, platform_leaves(platform), seed=2))
    assert f"{dropped} from model not in state dict" in repr(refused.value)
