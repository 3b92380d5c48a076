"""Media encoders sharded over CP (and the audio encoder over TP x CP) equal one process.

The index math is checked here without processes; the probe (``encoder_shard_probe.py``) runs the
tiny omni model on one packed sequence with images of three sizes, video, audio, audio in video
and a two-clip stream, placeholder runs straddling the CP shards, in real gloo processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omni_train.parallel.encoder_shard import EncoderGroup, assign, build_route, loads
from omni_train.stage.launch import torchrun

PROBE = Path(__file__).with_name("encoder_shard_probe.py")
# The MoE load-balancing loss is taken per CP shard by megatron-core (its token counts are the
# shard's), which moves the router's gradient by ~3 % under CP whatever the encoders do; the
# probe switches it off so that every gradient can be held to one process's.
COMMON = ["model.moe_aux_loss_coeff=0"]
RTOL_LOSS = 1e-6
RTOL_GRAD = 1e-5  # max |g - g_ref| / max |g_ref| per tensor (measured: <= 2.7e-6 at CP 2)

pytestmark = pytest.mark.xdist_group("encoder_shard")


def test_assignment_is_longest_first_onto_the_least_loaded_rank():
    assert assign([5, 1, 4, 4, 2], 2) == [0, 0, 1, 1, 0]  # 5->0, 4->1, 4->1, 2->0, 1->0
    assert loads([5, 1, 4, 4, 2], [0, 0, 1, 1, 0], 2) == [8, 8]
    assert assign([3, 3, 3], 4) == [0, 1, 2]  # fewer items than ranks: ranks left idle
    assert assign([], 3) == []
    costs = torch.randint(1, 50, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    assert assign(costs, 16) == assign(list(costs), 16)  # a pure function of the costs


def _routes(owner, dest, size, tp):
    return [build_route(owner, dest, EncoderGroup(None, size, m, tp)) for m in range(size)]


@pytest.mark.parametrize("tp,cp", [(1, 2), (1, 4), (2, 2), (2, 1)])
def test_routes_deliver_every_row_to_its_shard_and_every_gradient_once(tp, cp):
    """Simulate the all-to-all: forward, each member receives exactly the rows its CP rank
    needs, in global order; backward, each owner gets each of its rows' gradient once."""
    size, n = tp * cp, 37
    g = torch.Generator().manual_seed(tp * 10 + cp)
    owner = torch.randint(0, size, (n,), generator=g)
    dest = torch.randint(0, cp, (n,), generator=g)
    routes = _routes(owner, dest, size, tp)
    rows = torch.arange(n, dtype=torch.float64)[:, None]  # a row's value is its global index
    local = [rows[owner == m] for m in range(size)]

    def all_to_all(send, splits_out, splits_in):  # member m's piece for q, gathered at q
        pieces = [list(torch.split(send[m], splits_out[m])) for m in range(size)]
        recv = [torch.cat([pieces[p][q] for p in range(size)]) for q in range(size)]
        for q in range(size):
            assert recv[q].shape[0] == sum(splits_in[q])
        return recv

    send = [local[m][r.send_index] for m, r in enumerate(routes)]
    recv = all_to_all(send, [r.send_splits for r in routes], [r.recv_splits for r in routes])
    needed = [buf[r.recv_order] for buf, r in zip(recv, routes, strict=True)]
    for m in range(size):
        want = torch.nonzero(dest == m // tp).flatten().to(torch.float64)
        assert torch.equal(needed[m][:, 0], want)
    # backward: the gradient of a row is its index + 1000 * (receiving CP rank); each owner
    # must get each of its rows' gradient exactly once, from the row's CP rank
    grads = [needed[m] + 1000 * (m // tp) for m in range(size)]
    back = [grad[r.back_index] for grad, r in zip(grads, routes, strict=True)]
    got = all_to_all(back, [r.back_splits for r in routes], [r.back_recv_splits for r in routes])
    for m, r in enumerate(routes):
        out = torch.zeros(r.num_local, 1, dtype=torch.float64)
        out.index_copy_(0, r.back_target, got[m])
        mine = torch.nonzero(owner == m).flatten()
        assert torch.equal(out[:, 0], (mine + 1000 * dest[mine]).to(torch.float64))


def _probe(nproc: int, mode: str, out: Path, *overrides: str) -> dict:
    torchrun(nproc, str(PROBE), mode, str(out), *COMMON, *overrides)
    return json.loads((out / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("encoder_shard")
    return out, _probe(1, "reference", out)


LAYOUTS = {
    "cp2": (2, ["parallel=single", "parallel.cp=2"]),
    "tp2_sp": (2, ["parallel=tp2"]),
    "cp4": (4, ["parallel=single", "parallel.cp=4"]),
    "tp2_cp2": (4, ["parallel=tp2", "parallel.cp=2"]),
}


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    ["cp2", "tp2_sp", pytest.param("cp4", marks=pytest.mark.slow),
     pytest.param("tp2_cp2", marks=pytest.mark.slow)],
)  # fmt: skip
def test_sharded_encoders_equal_one_process(layout, reference):
    out, ref = reference
    assert ref["straddling"]["2"][0] > 0 and ref["straddling"]["2"][1] > 0  # image and audio
    assert ref["straddling"]["4"][0] > 0 and ref["straddling"]["4"][1] > 0
    nproc, overrides = LAYOUTS[layout]
    run = _probe(nproc, layout, out, *overrides)
    assert abs(run["loss_sum"] - ref["loss_sum"]) <= RTOL_LOSS * abs(ref["loss_sum"])
    for comp, norm in ref["component_norms"].items():
        assert norm > 0, comp
        assert abs(run["component_norms"][comp] - norm) <= RTOL_GRAD * norm, comp
    diffs = run["grad_max_rel_diff"]
    assert run["zero_reference_grads"] == []
    # whole tensors on the rank: all of them without TP; under TP the ones not tensor parallel
    # (among them the audio encoder, whose clips are shared out over the TP ranks)
    if "tp" in layout:
        assert any(k.startswith("audio_encoder.") for k in diffs)
    else:
        assert len(diffs) == ref["num_parameters"]
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= RTOL_GRAD, f"{worst}: {diffs[worst]:.2e}"


_BATCHNORM = """
import tempfile, torch, torch.distributed as dist
dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
from omni_train.model.audio import GroupBatchNorm1d
torch.manual_seed(0)
native = torch.nn.BatchNorm1d(6)
ours = torch.nn.BatchNorm1d(6)
ours.__class__ = GroupBatchNorm1d
with torch.no_grad():
    for m in (native, ours):
        m.weight.uniform_(0.5, 1.5); m.bias.uniform_(-1, 1)
    ours.load_state_dict(native.state_dict())
x = torch.randn(3, 6, 11, dtype=torch.float64).float()
extra = torch.randn(1, 6, 11)  # a placeholder clip: weight 0
ours.group, ours.clip_weight = dist.group.WORLD, torch.tensor([1.0, 1.0, 1.0, 0.0])
a = x.clone().requires_grad_(); b = torch.cat([x, extra]).requires_grad_()
ya, yb = native(a), ours(b)
g = torch.randn_like(ya)
ya.backward(g); yb[:3].backward(g)
def rel(p, q): return float((p - q).abs().max() / q.abs().max())
print(max(rel(yb[:3], ya), rel(b.grad[:3], a.grad), rel(ours.weight.grad, native.weight.grad),
          rel(ours.bias.grad, native.bias.grad), rel(ours.running_mean, native.running_mean),
          rel(ours.running_var, native.running_var)))
print(float(b.grad[3].abs().max()), int(ours.num_batches_tracked), int(native.num_batches_tracked))
"""


def test_group_batchnorm_is_torch_batchnorm_and_ignores_placeholder_clips():
    """Over a group of one, GroupBatchNorm1d is torch's BatchNorm1d in output, input and weight
    gradients and running statistics; a zero-weight clip changes none of them."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _BATCHNORM], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst, placeholder_grad, counted, native = proc.stdout.split()[-4:]
    assert float(worst) < 1e-6
    assert float(placeholder_grad) == 0.0 and counted == native == "1"
