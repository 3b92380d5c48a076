"""How ``omni-train run`` asks torchrun to find the other nodes: each accepted form produces
arguments torchrun itself parses into the intended rendezvous, each ambiguous form is refused
before anything starts, and two c10d "nodes" on this machine train one stage together.

The bug this guards against: a bare ``--rdzv-endpoint`` is torchrun's *static* backend, in which
every node without ``--node-rank`` claims node rank 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.run import config_from_args, get_args_parser

from omni_train import cli
from omni_train.stage.launch import Rendezvous, default_run_id, torchrun_command


@pytest.fixture(autouse=True)
def _torchrun_env(monkeypatch):
    """torchrun's argument handling sets OMP_NUM_THREADS in the environment when it is unset."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


def torchrun_view(rdzv: Rendezvous, nproc: int = 2):
    """What torchrun makes of the command line ``omni-train run`` would give it."""
    cmd = torchrun_command(nproc, "-m", "omni_train.train", rendezvous=rdzv)
    args = get_args_parser().parse_args(cmd[cmd.index("torch.distributed.run") + 1 :])
    config, _, _ = config_from_args(args)
    return args, config


def test_one_node_is_standalone():
    args, config = torchrun_view(Rendezvous())
    assert args.standalone and config.min_nodes == config.max_nodes == 1


def test_an_endpoint_is_c10d_with_a_job_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    rdzv = Rendezvous(nnodes=4, endpoint="node0:29400")
    assert rdzv.torchrun_args() == [
        "--nnodes=4",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29400",
        "--rdzv-id=4242",
    ]
    _, config = torchrun_view(rdzv)
    assert (config.min_nodes, config.max_nodes) == (4, 4)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == (
        "c10d",
        "node0:29400",
        "4242",
    )
    explicit = Rendezvous(nnodes=4, endpoint="node0", run_id="stage3")
    assert torchrun_view(explicit)[1].run_id == "stage3"


def test_the_default_job_id_is_the_same_on_every_node():
    assert default_run_id({"SLURM_JOB_ID": "17"}) == "17"
    assert default_run_id({}) == "omni-train"


def test_one_node_with_an_endpoint_stays_c10d():
    """A one-node Slurm job takes the same path as a larger one."""
    _, config = torchrun_view(Rendezvous(nnodes=1, endpoint="node0:29400", run_id="j"))
    assert config.rdzv_backend == "c10d" and config.max_nodes == 1


def test_static_names_its_backend_and_node():
    rdzv = Rendezvous(nnodes=2, node_rank=1, master_addr="node0")
    args, config = torchrun_view(rdzv)
    assert config.rdzv_backend == "static" and args.node_rank == 1
    assert config.rdzv_endpoint == "node0:29500"
    port = torchrun_view(Rendezvous(nnodes=2, node_rank=0, master_addr="n", master_port=6000))
    assert port[1].rdzv_endpoint == "n:6000"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nnodes": 2}, "--nnodes > 1 needs --rdzv-endpoint"),
        ({"nnodes": 2, "node_rank": 0, "endpoint": "n:1", "master_addr": "n"}, "give one"),
        ({"nnodes": 2, "node_rank": 2, "master_addr": "n"}, r"--node-rank must be in \[0, 2\)"),
        ({"nnodes": 2, "node_rank": 1}, "--node-rank needs --master-addr"),
        ({"nnodes": 2, "endpoint": "n:1", "master_addr": "n"}, "go with --node-rank"),
        ({"nnodes": 2, "endpoint": "n:1", "master_port": 5}, "go with --node-rank"),
        ({"run_id": "x"}, "--rdzv-id goes with --rdzv-endpoint"),
        ({"nnodes": 2, "endpoint": ":29400"}, "needs a host"),
        ({"nnodes": 0}, "at least 1"),
    ],
)
def test_ambiguous_forms_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rendezvous(**kwargs)


@pytest.fixture
def launched(monkeypatch):
    """``omni-train run`` up to the launch: the rendezvous it would hand to torchrun."""
    seen = []
    monkeypatch.setattr(cli, "launch_job", lambda o, n, r: seen.append((n, r)) or 0)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    return seen


def test_cli_builds_each_form(launched):
    base = ["run", "--no-plan", "--nproc-per-node", "8", "stage=smoke"]
    assert cli.main([*base, "--nnodes", "2", "--rdzv-endpoint", "node0:29400"]) == 0
    assert cli.main([*base, "--nnodes", "2", "--node-rank", "1", "--master-addr", "node0"]) == 0
    assert cli.main(base) == 0
    (_, c10d), (_, static), (_, single) = launched
    assert c10d == Rendezvous(nnodes=2, endpoint="node0:29400")
    assert c10d.torchrun_args()[-1] == "--rdzv-id=omni-train"
    assert static == Rendezvous(nnodes=2, node_rank=1, master_addr="node0")
    assert single.backend == "standalone"


@pytest.mark.parametrize(
    "extra",
    [
        ["--nnodes", "2"],
        ["--nnodes", "2", "--rdzv-endpoint", "n:1", "--node-rank", "0", "--master-addr", "n"],
        ["--nnodes", "2", "--rdzv-endpoint", "n:1", "--master-port", "6000"],
        ["--rdzv-id", "x"],
    ],
)
def test_cli_refuses_before_launching(launched, capsys, extra):
    assert cli.main(["run", "--no-plan", "stage=smoke", *extra]) == 2
    assert "omni-train: error: --" in capsys.readouterr().err
    assert launched == []


def test_dry_run_needs_no_rendezvous(launched, monkeypatch):
    """A dry run of a 64-node job runs on a laptop: no endpoint to give."""
    calls = []
    monkeypatch.setattr(cli, "_dry_run", lambda a, o: calls.append(a.nnodes) or 0)
    assert cli.main(["run", "--dry-run", "--nnodes", "64", "stage=smoke"]) == 0
    assert calls == [64] and launched == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_c10d_nodes_train_one_stage(tmp_path):
    """Two ``omni-train run`` processes, one rank each, meet at a c10d endpoint and train the
    smoke stage with TP=2 across them: one world of 2, one manifest, exit 0 on both "nodes"."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "omni_train.cli", "run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "c10d-test",
        "stage=smoke", "model=tiny", "parallel=tp2", "trainer.save_interval=0",
        f"checkpoint.output_dir={out}",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("SLURM_JOB_ID", None)
    start = time.monotonic()
    nodes = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["layout"]["world"] == 2
    print(f"two c10d nodes: {time.monotonic() - start:.0f} s")


def sbatch_script(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """``launchers/slurm.sbatch`` run by bash outside Slurm, srun and scontrol stubbed: what it
    would hand each node (a two-node job, nodes node7 and node8)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'node7\\nnode8\\n'\n")
    (stubs / "srun").write_text(
        "#!/bin/sh\nenv | grep -E '^(GPUS_PER_NODE|NNODES|RDZV_ENDPOINT|RDZV_ID|NODE_RANK)=' "
        '| sort\necho "srun $*"\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "77", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[7-8]"}
    env = {"PATH": f"{stubs}:/usr/bin:/bin", **slurm, "SLURM_CPUS_ON_NODE": "32", **env}
    return subprocess.run(
        ["bash", "launchers/slurm.sbatch", "stage=smoke"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("env", "ranks"),
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8", "GPUS_PER_NODE": "2"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "h100:8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "8", "GPUS_PER_NODE": "2"}, "8"),
        ({"GPUS_PER_NODE": "2"}, "2"),
    ],
)
def test_sbatch_takes_gpus_per_node_from_slurm(tmp_path, env, ranks):
    done = sbatch_script(tmp_path, NODE_RANK="3", **env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1:] == [
        f"GPUS_PER_NODE={ranks}",
        "NNODES=2",
        "RDZV_ENDPOINT=node7:29400",
        "RDZV_ID=77",
        "srun --kill-on-bad-exit=1 --cpus-per-task=32 launchers/torchrun_multinode.sh stage=smoke",
    ]  # no NODE_RANK: c10d numbers the nodes


@pytest.mark.parametrize(
    "env", [{}, {"SLURM_GPUS_PER_NODE": "a100:2,v100:2"}, {"GPUS_PER_NODE": "0"}]
)
def test_sbatch_without_a_gpu_count_stops(tmp_path, env):
    done = sbatch_script(tmp_path, **env)
    assert done.returncode == 2 and "how many GPUs per node?" in done.stderr
    assert "srun" not in done.stdout
