"""A quiet front door (issue #36): library lines our users cannot act on are filtered at
omni-train's entry points, each by message and module (omni_train/log.py, QUIET); a failed stage
ends with omni-train's own summary, torchrun's traceback and table in logs/torchrun.log;
``--verbose`` shows everything. The processes are real: the CLI, torchrun, the ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import fault_corpus
import pytest

from omni_train import log
from omni_train.log import QUIET, Quiet, install_filters

NOISE = "Transformer Engine and Apex are not installed"


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", log.VERBOSE_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "omni_train.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _specific(q: Quiet) -> bool:
    """A filter names who says it and what: a module (or logger) that is a package path, and a
    message with enough literal text to be one line, never ``""`` or ``.*``."""
    literal = re.sub(r"\\.|[.*+?^$|()\[\]{}]", "", q.message)
    if q.source == "logging":
        return bool(re.fullmatch(r"[a-z_][\w.]*", q.module)) and len(literal) >= 15
    return bool(re.match(r"[a-z_]\w*\\\.", q.module)) and len(literal) >= 15


def test_every_filter_names_its_module_and_message():
    assert not _specific(Quiet(UserWarning, "", "", "blanket"))
    assert not _specific(Quiet(UserWarning, r".*", r".*deprecated", "any module"))
    assert not _specific(Quiet(UserWarning, r"megatron\.", r".*", "any message"))
    assert not _specific(Quiet("logging", "", r"No exporters were provided", "the root logger"))
    for q in QUIET:
        assert _specific(q), q
        assert q.why.strip(), q
        assert q.source == "logging" or issubclass(q.source, Warning), q


def test_a_filter_hides_its_line_from_its_module_only(monkeypatch):
    monkeypatch.setattr(log, "_installed", set())
    monkeypatch.delenv(log.VERBOSE_ENV, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        install_filters()
        added = [f for f in warnings.filters if f not in before]
        assert len(added) == sum(1 for q in QUIET if q.source != "logging" and not q.platform)
        assert all(f[0] == "ignore" and f[1].pattern and f[3].pattern for f in added)
        for module in ("megatron.core.optimizer", "omni_train.model"):
            warnings.warn_explicit(f"{NOISE}. Falling back", UserWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in seen] == [f"{NOISE}. Falling back"]  # omni_train's: shown


def test_a_command_hides_library_noise_and_verbose_shows_it(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    jsonl = tmp_path / "text.jsonl"
    jsonl.write_text(json.dumps(fault_corpus._row("hello")) + "\n")
    show = ["data", "show", str(jsonl), "--media", str(media), "model=tiny"]
    quiet = _cli(*show)
    assert quiet.returncode == 0, quiet.stderr
    assert "It is hello." in quiet.stdout
    assert NOISE not in quiet.stderr and "UserWarning" not in quiet.stderr, quiet.stderr
    loud = _cli(*show, "--verbose")  # after the command, as well as before it
    assert loud.returncode == 0 and NOISE in loud.stderr, loud.stderr


@pytest.mark.distributed
def test_a_failed_stage_ends_with_our_summary_and_verbose_shows_torchruns(tmp_path):
    """Every sample undecodable: each rank's data worker gives up after 8 (the cheapest
    deterministic failure inside the ranks), in step 1."""
    data = fault_corpus.write_unusable(tmp_path / "data")
    stage = [
        "stage=smoke_omni", "model=tiny", "parallel=single", f"data.path={data}",
        "data.blend=null", "data.synthetic_root=null", "data.num_workers=1",
        "data.packing.enabled=false", "data.skip_check_min_samples=8", "trainer.seq_length=512",
        "trainer.micro_batch_size=1", "trainer.global_batch_size=2", "trainer.train_steps=4",
        "trainer.eval_iters=0",
    ]  # fmt: skip
    out = tmp_path / "a"
    run = ["run", "--no-plan", "--nproc-per-node", "2", *stage]
    failed = _cli(*run, f"checkpoint.output_dir={out}")
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    where, why = lines[-2:]
    logs = out / "logs"
    assert where == (
        f"omni-train: ranks 0, 1 failed in step 1/4; its log: {logs / 'rank_0.log'}; "
        f"torchrun's own report: {logs / 'torchrun.log'}"
    ), failed.stderr
    assert why.startswith("omni-train: stage smoke_omni failed: the last 8 samples"), why
    assert "ChildFailedError" not in failed.stderr
    assert "Traceback (most recent call last)" not in failed.stderr
    assert NOISE not in failed.stderr and len(lines) <= 6, failed.stderr
    report = (logs / "torchrun.log").read_text()
    assert "ChildFailedError" in report and "Root Cause" in report
    assert "skipping sample img0" in (logs / "rank_0.log").read_text()

    one = ["--verbose", "run", "--no-plan", "--nproc-per-node", "1", *stage]  # one rank: cheaper
    loud = _cli(*one, f"checkpoint.output_dir={tmp_path / 'b'}")
    assert loud.returncode == 1
    assert "ChildFailedError" in loud.stderr and NOISE in loud.stderr
    last = loud.stderr.strip().splitlines()
    assert last[-2].startswith("omni-train: rank 0 failed in step 1/4; its log: ")
    assert "torchrun's own report" not in last[-2]
    assert not (tmp_path / "b" / "logs" / "torchrun.log").exists()


@pytest.mark.distributed
def test_a_failed_curriculum_stage_ends_with_the_same_summary(tmp_path):
    """The curriculum launches its stages as ``omni-train run`` does: a stage that fails ends
    the command with the stage's summary and one curriculum line, no traceback."""
    data = fault_corpus.write_unusable(tmp_path / "data")
    failed = _cli(
        "curriculum", "--runs-dir", str(tmp_path / "runs"), "model=tiny",
        f"data.path={data}", "data.blend=null", "data.synthetic_root=null", "data.num_workers=1",
        "data.packing.enabled=false", "data.skip_check_min_samples=8", "trainer.train_steps=4",
        "trainer.eval_iters=0",
    )  # fmt: skip
    assert failed.returncode == 1
    stage = "stage0_vision_projector_warmup"
    logs = tmp_path / "runs" / "tiny" / stage / "logs"
    *_, where, why, curriculum = failed.stderr.strip().splitlines()
    assert where.startswith("omni-train: ranks 0, 1 failed in step 1/4; its log: "), where
    assert f"torchrun's own report: {logs / 'torchrun.log'}" in where
    assert why.startswith(f"omni-train: stage {stage} failed: the last 8 samples"), why
    assert curriculum.startswith(f"omni-train curriculum: stage {stage} failed (exit code 1)")
    assert "Traceback (most recent call last)" not in failed.stderr
    assert "ChildFailedError" not in failed.stderr and NOISE not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) <= 5, failed.stderr
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == [stage]  # none after it
