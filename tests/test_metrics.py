"""See the run: a tiny 2-rank run with TensorBoard and wandb (offline) on; their scalars equal
the manifest's; periodic evaluation; `omni-train report` pictures from that run."""

from __future__ import annotations

import glob
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from launch import launch

from omni_train.training.metrics import MODALITIES

pytestmark = [pytest.mark.distributed, pytest.mark.xdist_group("metrics")]  # one fixture run

STEPS = 4


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("logged") / "run"
    m = launch(
        2,
        out,
        "stage=smoke_omni",
        "model=tiny",
        "parallel=tp2",
        f"data.synthetic_root={synth_root}",
        f"trainer.train_steps={STEPS}",
        "trainer.eval_interval=2",
        "trainer.eval_iters=1",
        "logging.tensorboard=true",
        "logging.wandb=true",
        "logging.peak_tflops=0.001",  # CPU: no table entry; a stand-in peak for the MFU column
    )
    return out, m


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline wandb run: its ``.wandb`` file is a LevelDB-format log
    (``:W&B`` header, 32 KiB blocks, 7-byte record headers) of protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "*run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, rows, chunks = 7, [], []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item
                    }  # fmt: skip
                )
    return rows


def test_manifest_has_every_step_and_periodic_evals(run):
    _, m = run
    rows = m["metrics"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["train/loss"] for r in rows] == m["losses"]
    for r in rows:
        modal = {k.split("/")[2] for k in r if k.startswith("train/loss/")}
        assert modal and modal <= set(MODALITIES)
        assert r["throughput/tflops_per_gpu"] > 0
        assert r["throughput/hw_tflops_per_gpu"] >= r["throughput/tflops_per_gpu"]
        assert math.isclose(r["throughput/mfu"], r["throughput/tflops_per_gpu"] / 0.001)
        assert 0 <= r["data/padding"] < 1 and r["memory/gib"] > 0.1
        assert r["throughput/tokens_per_s"] > 0 and r["time/eta_stage_s"] >= 0
    assert [r["data/tokens"] for r in rows] == sorted(r["data/tokens"] for r in rows)
    assert rows[-1]["data/tokens"] == m["tokens"]
    assert [(e["step"], e["when"]) for e in m["evals"]] == [(2, "interval"), (4, "end")]
    assert m["evals"][-1]["loss"] == m["eval_loss"]


def test_tensorboard_scalars_equal_the_manifest(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, m = run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("train/loss", "train/grad_norm", "throughput/tflops_per_gpu", "memory/gib"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == {r["step"]: np.float32(r[key]) for r in m["metrics"]}, key
    evals = {e.step: e.value for e in events.Scalars("eval/loss")}
    assert evals == {e["step"]: np.float32(e["loss"]) for e in m["evals"]}


def test_wandb_offline_history_equals_the_manifest(run):
    out, m = run
    history = [r for r in wandb_history(out) if "train/loss" in r]
    assert [r["_step"] for r in history] == [r["step"] for r in m["metrics"]]
    for logged, row in zip(history, m["metrics"], strict=True):
        for key, value in row.items():
            if key != "step":
                assert logged[key] == value, key


def test_report_writes_the_pictures_and_the_page(run, tmp_path):
    out, m = run
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "report", str(out), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("loss.png", "throughput.png", "memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (tmp_path / "index.html").read_text()
    assert m["stage"] in page and "loss.png" in page


def test_a_modality_absent_from_a_stage_leaves_a_gap_in_its_curve():
    from omni_train.stage.report import _series

    stages = [
        {"metrics": [{"step": 1, "data/tokens": 10, "train/loss/image": 1.0}]},
        {"metrics": [{"step": 1, "data/tokens": 5}]},  # an audio stage: no image samples
        {"metrics": [{"step": 1, "data/tokens": 7, "train/loss/image": 2.0}]},
    ]
    xs, ys = _series(stages, "train/loss/image")
    assert xs == [10, 10, 22]  # tokens accumulate over the stages
    assert ys[0] == 1.0 and math.isnan(ys[1]) and ys[2] == 2.0
