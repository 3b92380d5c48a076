"""``launchers/slurm.sbatch`` under a real Slurm (``make test-slurm``; not in ``make test``): a
one-node cluster of Debian's slurmctld and slurmd (``tests/slurm/cluster.sh``), the tiny smoke
stage on the CPU with 2 ranks.

- GPUs per node come from Slurm: ``--gpus-per-node 2`` on a node with two stand-in GPUs
  gives 2 ranks. A job that shares its node (``--oversubscribe``; a whole node comes with all
  its GPUs) has no GPU allocation: ``GPUS_PER_NODE`` gives the count, and with neither the job
  stops before starting anything.
- SIGUSR1 as Slurm's warning sends it (``scancel --batch``: the batch shell only), after the
  first periodic checkpoint: the ranks write a checkpoint, the job exits with 75 and requeues
  itself, the requeued job resumes and completes with the losses of an uninterrupted run.
- Slurm's own SIGTERM (``scancel``; the time limit and preemption send it the same way, to
  every process of the job) after the first periodic checkpoint: megatron's checkpoint helper
  processes inherit blocked stop signals (``checkpoint/io.py``), so the ranks' stop checkpoint
  completes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
SCRATCH = Path(os.environ.get("SLURM_TEST_DIR", REPO / "runs" / "slurm"))
SBATCH = "launchers/slurm.sbatch"
SHARED = ["--oversubscribe", "--cpus-per-task", "2"]  # no GPUs; both CPUs for the 2 ranks
# 30 steps (about 0.3 s each here) with a checkpoint every 6: room to stop after the first one.
STAGE = ["stage=smoke", "model=tiny", "parallel=tp2", "trainer.train_steps=30"]


@pytest.fixture(scope="module")
def slurm_env():
    """The cluster, up for this module; the environment jobs are submitted with."""
    cluster_env = dict(os.environ, SLURM_TEST_DIR=str(SCRATCH))
    subprocess.run([str(CLUSTER), "up"], check=True, env=cluster_env)
    shutil.rmtree(SCRATCH / "jobs", ignore_errors=True)  # an earlier run's output folders
    (SCRATCH / "jobs").mkdir()  # Slurm creates no folder for a job's log
    env = dict(
        os.environ,
        SLURM_CONF=str(SCRATCH / "etc" / "slurm.conf"),
        OMNI_TRAIN_PLATFORM="cpu",
        PYTHON=sys.executable,
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore",
        OMP_NUM_THREADS="1",
    )
    for name in ("GPUS_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "NODE_RANK", "SLURM_JOB_ID"):
        env.pop(name, None)
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER), "down"], check=True, env=cluster_env)


def submit(
    env: dict, name: str, *args: str, wait: bool, stage: list[str] = STAGE
) -> tuple[int, int, Path]:
    """``sbatch [--wait] ARGS launchers/slurm.sbatch STAGE``; (job id, sbatch's exit code, log)."""
    log = SCRATCH / "jobs" / f"{name}-%j.out"
    cmd = ["sbatch", "--parsable", "--job-name", name, "--output", str(log), *args]
    cmd += ["--wait"] if wait else []
    done = subprocess.run(
        [*cmd, SBATCH, *stage, f"checkpoint.output_dir={SCRATCH / 'jobs' / name}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    job = int(re.match(r"\d+", done.stdout).group()) if re.match(r"\d+", done.stdout) else -1
    assert job > 0, done.stderr
    return job, done.returncode, Path(str(log).replace("%j", str(job)))


def job_info(env: dict, job: int) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", str(job)], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def manifest(name: str) -> dict:
    return json.loads((SCRATCH / "jobs" / name / "manifest.json").read_text())


@pytest.fixture(scope="module")
def whole(slurm_env):
    """The stage, uninterrupted, with 2 ranks from ``--gpus-per-node 2``."""
    job, rc, log = submit(slurm_env, "whole", "--gpus-per-node", "2", wait=True)
    return job, rc, log.read_text()


def test_ranks_per_node_from_the_gpu_allocation(whole):
    job, rc, text = whole
    assert rc == 0, text[-4000:]
    assert f"job {job} (restart 0): 1 node(s) x 2 rank(s), c10d rendezvous" in text
    assert "stage smoke on cpu: world=2 tp=2" in text
    done = manifest("whole")
    assert done["status"] == "completed" and done["step"] == 30
    assert done["layout"]["world"] == 2
    assert Path(done["checkpoint"]).is_dir() and done["checkpoint"].endswith("step_0000030")


def test_a_whole_node_brings_all_its_gpus(slurm_env):
    """No --gpus-per-node: the script's --exclusive allocates the node's GPUs all the same
    (a stage that does not exist ends the job right after the count is printed)."""
    job, rc, log = submit(slurm_env, "exclusive", wait=True, stage=["stage=no_such_stage"])
    assert f"job {job} (restart 0): 1 node(s) x 2 rank(s)" in log.read_text()
    assert rc != 0


def test_no_gpu_count_stops_before_anything_starts(slurm_env):
    _, rc, log = submit(slurm_env, "nogpus", *SHARED, wait=True)
    assert rc == 2
    assert "how many GPUs per node?" in log.read_text()
    assert not (SCRATCH / "jobs" / "nogpus").exists()


def test_sigusr1_checkpoints_requeues_and_resumes(slurm_env, whole):
    """The warning two steps after the first periodic checkpoint (at step 6: megatron's
    checkpoint helper processes exist by then, and the stop writes a new checkpoint), 2 ranks
    from GPUS_PER_NODE (no GPU allocation)."""
    env = dict(slurm_env, GPUS_PER_NODE="2")
    job, rc, log = submit(env, "usr1", *SHARED, wait=False)
    assert rc == 0
    deadline = time.monotonic() + 600
    while "step 8/30 " not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        assert job_info(env, job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], env=env, check=True)
    while (info := job_info(env, job))["JobState"] != "COMPLETED" or info["Restarts"] == "0":
        assert time.monotonic() < deadline, f"{info['JobState']}\n{log.read_text()[-4000:]}"
        assert info["JobState"] not in ("FAILED", "CANCELLED", "TIMEOUT"), log.read_text()[-4000:]
        time.sleep(0.5)
    text = log.read_text()
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    assert f"job {job} (restart 0): 1 node(s) x 2 rank(s)" in text
    assert "stop requested (SIGUSR1)" in text and f"requeueing job {job}" in text
    stopped = re.search(r"stage smoke interrupted: step (\d+)/30", text)
    assert stopped, text[-4000:]
    assert "again: exiting now" not in text  # one request, not two
    assert f"job {job} (restart 1): 1 node(s) x 2 rank(s)" in text
    done = manifest("usr1")
    step = int(stopped.group(1))
    assert 8 <= step < 30
    assert done["status"] == "completed" and done["resumed_from"].endswith(f"step_{step:07d}")
    assert done["losses"] == manifest("whole")["losses"]


def test_scancel_after_a_checkpoint_stops_with_a_checkpoint(slurm_env):
    """``scancel`` (SIGTERM to every process of the job, as at the time limit or on preemption)
    two steps after the first periodic checkpoint: the ranks should stop with a checkpoint
    within Slurm's KillWait (30 s)."""
    job, rc, log = submit(slurm_env, "term", "--gpus-per-node", "2", wait=False)
    deadline = time.monotonic() + 600
    while "step 8/30 " not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    subprocess.run(["scancel", str(job)], env=slurm_env, check=True)
    end = time.monotonic() + 60  # KillWait, and then some
    while (stopped := manifest("term"))["status"] == "running" and time.monotonic() < end:
        time.sleep(0.5)
    assert stopped["status"] == "interrupted", log.read_text()[-3000:]
    assert stopped["stop_reason"] == "signal SIGTERM" and Path(stopped["checkpoint"]).is_dir()
