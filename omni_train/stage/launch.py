"""Launch a stage's ranks with torchrun: pre-flight checks first, then a supervised torchrun.

Used by ``omni-train run`` (one node, or one call per node), the curriculum command, the
benchmarks and the tests. Nothing here imports megatron-core: the checks read the filesystem.

**Pre-flight** (:func:`preflight`), before any process starts: the config validates for the
world size; the output folder can be created and written and has room for one checkpoint (an
estimate from the closed-form parameter counts); no live run holds its lock; a resume, a handoff
(``checkpoint.init_from``) or pretrained components would be accepted. Each rank repeats the
checks that matter under the lock.

**Supervision** (:func:`run_supervised`): torchrun runs in a session of its own, ignoring
SIGTERM/SIGINT/SIGUSR1 (``--signals-to-handle`` leaves them to the ranks), and dies with
this process (``PR_SET_PDEATHSIG``); its ranks die with it. A stop signal this process receives
goes once to each rank (torchrun's children: it starts every rank in a session of its own), where
every rank handles it (``omni_train.lifecycle``):
the step finishes, a checkpoint is written, the ranks exit with ``EXIT_INTERRUPTED``, which
this launcher passes on. Left to torchrun, the signal would be forwarded to the ranks and they
would be killed 30 s later, before a large checkpoint is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from omni_train.checkpoint import integrity
from omni_train.checkpoint.layout import step_dirs
from omni_train.checkpoint.lock import TOKEN_ENV, OutputLock, check_unlocked
from omni_train.checkpoint.manifest import mark_failed
from omni_train.config import compose_job, validate
from omni_train.lifecycle import EXIT_INTERRUPTED, STOP_SIGNALS, die_with_parent
from omni_train.log import error_path, human_bytes, rank_log_path, verbose
from omni_train.model.count import parameter_counts
from omni_train.stage.handoff import check_components, check_handoff
from omni_train.stage.resume import decide, schedule_notes

_HEADROOM = 1.1  # free space wanted beyond the estimated checkpoint size


DEFAULT_RUN_ID = "omni-train"
AGENT = "omni_train.stage.agent"  # torchrun, its own output in a file
QUIET_MODULE = ("-m", "omni_train.quiet")  # then a module: run as a program, the log filters first
C10D_PORT = 29400  # torchrun's own default for a c10d endpoint without a port


def default_run_id(environ=os.environ) -> str:
    """The c10d rendezvous id when none is given: every node of a Slurm job sees the same
    ``SLURM_JOB_ID`` (and a requeued job keeps it); elsewhere a constant, which is enough while
    one job at a time uses an endpoint."""
    return environ.get("SLURM_JOB_ID") or DEFAULT_RUN_ID


@dataclass(frozen=True)
class Rendezvous:
    """How this node's torchrun finds the others. Raises ``ValueError`` for a combination
    torchrun would misread, since the misreading shows only as a hang or a wrong world.

    - one node, nothing else given: ``--standalone`` (a private store on a free port);
    - ``endpoint`` (host[:port], one of the nodes): c10d. Every node runs the same command
      and the rendezvous numbers the nodes, so nothing per node has to be known; what Slurm
      uses. ``run_id`` must be the same on every node (see :func:`default_run_id`);
    - ``node_rank`` + ``master_addr``: static. Each node is told its rank, node 0 hosts the
      store; valid torchrun usage for schedulers that hand out node ranks themselves.

    A bare ``--rdzv-endpoint`` without ``--rdzv-backend=c10d`` would be torchrun's static
    backend with every node claiming node rank 0, which is why c10d is always spelled out.
    """

    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    endpoint: str | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be at least 1, got {self.nnodes}")
        static = self.node_rank is not None
        if static and self.endpoint:
            raise ValueError(
                "--node-rank (static rendezvous) and --rdzv-endpoint (c10d) are two ways to "
                "find the other nodes; give one"
            )
        if self.nnodes > 1 and not static and not self.endpoint:
            raise ValueError(
                "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (c10d: the same command on "
                "every node) or --node-rank R --master-addr HOST (static)"
            )
        if static and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if static and not self.master_addr:
            raise ValueError("--node-rank needs --master-addr (node 0's address)")
        if not static and (self.master_addr or self.master_port is not None):
            raise ValueError("--master-addr and --master-port go with --node-rank (static)")
        if self.run_id is not None and not self.endpoint:
            raise ValueError("--rdzv-id goes with --rdzv-endpoint (c10d)")
        if self.endpoint and not self.endpoint.rsplit(":", 1)[0].strip("[]"):
            raise ValueError(f"--rdzv-endpoint needs a host: HOST[:PORT], got {self.endpoint!r}")

    @property
    def backend(self) -> str:
        if self.endpoint:
            return "c10d"
        return "static" if self.node_rank is not None else "standalone"

    def torchrun_args(self) -> list[str]:
        args = [f"--nnodes={self.nnodes}"]
        if self.backend == "standalone":
            return [*args, "--standalone"]
        if self.backend == "static":
            return [
                *args,
                "--rdzv-backend=static",
                f"--node-rank={self.node_rank}",
                f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port or 29500}",
            ]
        return [
            *args,
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id or default_run_id()}",
        ]


def torchrun_command(
    nproc: int,
    *target: str,
    rendezvous: Rendezvous = Rendezvous(),
    report: str | os.PathLike | None = None,
) -> list[str]:
    """``python -m torch.distributed.run ...`` for one node of the job. Stop signals are left to
    the ranks (see :func:`run_supervised`); torchrun keeps SIGHUP/SIGQUIT. With ``report``,
    torchrun's own output (its log lines, its failure traceback and table) goes to that file
    instead of the console (:mod:`omni_train.stage.agent`); the ranks' output does not."""
    runner = ["torch.distributed.run"] if report is None else [AGENT, str(report)]
    cmd = [sys.executable, "-m", *runner, f"--nproc-per-node={nproc}"]
    cmd.append("--signals-to-handle=SIGHUP,SIGQUIT")
    return [*cmd, *rendezvous.torchrun_args(), *target]


def torchrun_report(output_dir: str | os.PathLike, rendezvous: Rendezvous = Rendezvous()) -> Path:
    """Where this node's torchrun writes what it says itself; one file per host when several
    nodes share the output folder."""
    name = "torchrun.log" if rendezvous.nnodes == 1 else f"torchrun_{socket.gethostname()}.log"
    return Path(output_dir) / "logs" / name


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux ``/proc``): torchrun's are the ranks. Their own
    children (megatron's checkpoint writer processes) must not get a stop signal: killed in the
    middle of a save, they would break the very checkpoint the stop is for."""
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def _child() -> None:
    """Runs in the forked child before exec: die with the launcher; leave stop signals to the
    ranks (ignored dispositions survive exec; the ranks install their own handlers)."""
    die_with_parent()
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def run_supervised(
    cmd: list[str], env: dict | None = None, *, capture: bool = False, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run torchrun ``cmd`` as described in the module docstring; stop signals received here
    are forwarded to its processes while it runs."""
    env = dict(os.environ if env is None else env)
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(
        cmd, env=env, stdout=pipe, stderr=pipe, text=True, start_new_session=True,
        preexec_fn=_child,
    )  # fmt: skip
    previous = {}
    if threading.current_thread() is threading.main_thread():

        def forward(signum, frame) -> None:
            for pid in children(proc.pid):
                with contextlib.suppress(ProcessLookupError):  # already gone
                    os.kill(pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def torchrun(
    nproc: int, *target: str, timeout: int | None = 1800, capture: bool = True
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node nproc TARGET...`` (a script path or ``-m
    module``, then its arguments), one thread per rank, supervised. Raises ``RuntimeError`` on
    failure, with the run's output tail when it was captured (``capture=False`` streams it)."""
    cmd = torchrun_command(nproc, *target)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on few cores: one thread each
    proc = run_supervised(cmd, env, capture=capture, timeout=timeout)
    if proc.returncode != 0:
        tail = f"\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}" if capture else ""
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}{tail}")
    return proc


def launch_stage(nproc: int, output_dir: str | os.PathLike, *overrides: str, timeout: int = 1800):
    """``torchrun --nproc-per-node nproc -m omni_train.train`` with ``overrides``; the run's
    ``manifest.json`` as a dict. A stop by signal returns the (interrupted) manifest; any
    other failure raises ``RuntimeError`` with the run's output tail."""
    target = ["-m", "omni_train.train", *overrides, f"checkpoint.output_dir={output_dir}"]
    before = manifest_mtime(output_dir)
    try:
        torchrun(nproc, *target, timeout=timeout)
    except RuntimeError:
        if not stopped_by_signal(output_dir, before):
            raise
    return json.loads((Path(output_dir) / "manifest.json").read_text())


def manifest_mtime(output_dir: str | os.PathLike) -> int | None:
    """The manifest's modification time (ns), ``None`` without one: taken before a run, it
    lets :func:`stopped_by_signal` tell that run's manifest from an earlier run's."""
    path = Path(output_dir) / "manifest.json"
    return path.stat().st_mtime_ns if path.is_file() else None


def stopped_by_signal(output_dir: str | os.PathLike, manifest_mtime_before: int | None) -> bool:
    """Whether the run that just ended in ``output_dir`` stopped on a signal (its manifest,
    newer than ``manifest_mtime_before``, says so)."""
    path = Path(output_dir) / "manifest.json"
    if manifest_mtime(output_dir) in (None, manifest_mtime_before):
        return False
    manifest = json.loads(path.read_text())
    return manifest.get("status") == "interrupted" and str(manifest.get("stop_reason")).startswith(
        "signal"
    )


# ---- pre-flight --------------------------------------------------------------------------------


def checkpoint_bytes(cfg) -> int:
    """An estimate of one checkpoint: every weight in the training dtype, plus AdamW's state
    for the trainable ones (fp32 main copy and two moments: 12 bytes each)."""
    counts = parameter_counts(cfg.model)
    weight = 2 if cfg.trainer.precision == "bf16" else 4
    trainable = sum(n for name, n in counts.items() if name in cfg.stage.trainable)
    return sum(counts.values()) * weight + trainable * 12


def check_output_dir(cfg) -> None:
    """The output folder can be created and written, and has room for one checkpoint."""
    check_writable(cfg)
    check_room(cfg)


def check_writable(cfg) -> None:
    """The output folder can be created and written."""
    out = Path(cfg.checkpoint.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".omni-train-write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"checkpoint.output_dir={out} cannot be written ({e.strerror or e}); choose a "
            "folder this job can create and write"
        ) from None


def check_room(cfg) -> None:
    """The output folder has room for one checkpoint (an estimate: see docs/checkpoints.md)."""
    out = Path(cfg.checkpoint.output_dir)
    # the closed form's tensors, with torch_dist's framing and metadata (+16 MiB; the ranks
    # check the exact size from the model's sharded state before the first step)
    need = checkpoint_bytes(cfg) * _HEADROOM + 16 * 1024**2
    newest = step_dirs(out)
    if newest and integrity.checkpoint_bytes(newest[0]):  # a checkpoint of this run: its real size
        need = max(need, integrity.checkpoint_bytes(newest[0]) * _HEADROOM)
    free = shutil.disk_usage(out).free
    if free < need:
        raise ValueError(
            f"checkpoint.output_dir={out} has {human_bytes(free)} free but one checkpoint of "
            f"this stage takes about {human_bytes(need)}; free space or choose another folder"
        )


def check_resume_layout(cfg, world_size: int, latest: Path) -> None:
    """A resume needs the world size that wrote the checkpoint (read from its manifest)."""
    manifest = Path(cfg.checkpoint.output_dir) / "manifest.json"
    if not manifest.is_file():
        return
    saved = json.loads(manifest.read_text()).get("layout", {}).get("world")
    if saved is not None and saved != world_size:
        raise ValueError(
            f"cannot resume {latest}: it was written by {saved} ranks, this job has "
            f"{world_size}. Resume with the same layout, or start a new run from its weights "
            f"with checkpoint.init_from={latest} and a fresh checkpoint.output_dir"
        )


def preflight(cfg, world_size: int, *, locked: bool = False) -> list[str]:
    """Every check that needs no GPU, no process group and no megatron-core (raises
    ``ValueError`` saying what to do). Returns the notes of the resume decision (a damaged
    checkpoint passed over, ...), for the launcher to print."""
    validate(cfg, world_size)
    check_output_dir(cfg)
    if not locked:  # ``locked``: this launcher holds the lock itself
        check_unlocked(cfg.checkpoint.output_dir)
    decision = decide(cfg)
    if decision.path is not None:
        check_resume_layout(cfg, world_size, decision.path)
        decision.notes += schedule_notes(cfg, Path(cfg.checkpoint.output_dir))
    elif cfg.checkpoint.init_from:
        check_handoff(cfg)
    else:
        check_components(cfg)
    return decision.notes


def launch_job(overrides: list[str], nproc: int, rendezvous: Rendezvous = Rendezvous()) -> int:
    """``omni-train run``: pre-flight, then this node's torchrun, supervised. Returns the exit
    code: 0, ``EXIT_INTERRUPTED`` (stopped by a signal with a checkpoint; run the same
    command again to resume) or torchrun's failure code."""
    cfg = compose_job(overrides)
    env = dict(os.environ)
    lock = None
    # The node that will hold rank 0 takes the output folder's lock now, before torchrun, and
    # hands it to the ranks: a second run into the folder is refused here in seconds. With c10d
    # no node knows its rank before the rendezvous: rank 0 takes the lock itself.
    if rendezvous.backend == "standalone" or rendezvous.node_rank == 0:
        validate(cfg, nproc * rendezvous.nnodes)  # config errors first, as without the lock
        check_writable(cfg)  # the folder must exist (and be writable) to hold a lock
        lock = OutputLock(cfg.checkpoint.output_dir).acquire()
        env[TOKEN_ENV] = lock.token
    try:
        for note in preflight(cfg, nproc * rendezvous.nnodes, locked=lock is not None):
            print(f"omni-train: {note}", file=sys.stderr)
        return run_ranks(cfg, overrides, nproc, rendezvous, env)
    finally:
        if lock is not None:
            lock.release()


def run_ranks(
    cfg, overrides: list[str], nproc: int, rendezvous: Rendezvous = Rendezvous(), env=None
) -> int:
    """This node's ranks of the stage ``cfg`` (composed from ``overrides``): torchrun, supervised,
    its own output in the stage's ``logs/`` (the console with ``--verbose``). Returns 0,
    ``EXIT_INTERRUPTED`` (stopped by a signal with a checkpoint) or torchrun's failure code,
    after printing the launcher's summary of the failure."""
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on few cores: one thread each
    # torchrun's own traceback and failure table would bury the one line that says what failed;
    # they go to a file, and the summary names it (all of it on the console: --verbose)
    report = None if verbose() else torchrun_report(cfg.checkpoint.output_dir, rendezvous)
    cmd = torchrun_command(
        nproc, "-m", "omni_train.train", *overrides, rendezvous=rendezvous, report=report
    )
    before = manifest_mtime(cfg.checkpoint.output_dir)
    started = time.time()
    code = run_supervised(cmd, env).returncode
    if code != 0 and stopped_by_signal(cfg.checkpoint.output_dir, before):
        return EXIT_INTERRUPTED
    if code != 0:
        print(failure_summary(cfg, before, code, started, report), file=sys.stderr)
    return code


def failure_summary(
    cfg,
    manifest_mtime_before: int | None,
    code: int,
    started: float,
    report: str | os.PathLike | None = None,
) -> str:
    """After a failed run: the manifest says ``failed`` (marked here when no rank could: a
    rank that died, or rank 0 waiting on one), and the launcher's summary says which rank, at
    which step, and where its traceback is; its last line says why. ``report``: torchrun's own
    output (:mod:`omni_train.stage.agent`), named in the summary and read for the rank that
    failed first when no rank said why."""
    out = Path(cfg.checkpoint.output_dir)
    logs = out / "logs"
    error, step = None, None
    if manifest_mtime(out) not in (None, manifest_mtime_before):
        with contextlib.suppress(OSError, ValueError):
            manifest = json.loads((out / "manifest.json").read_text())
            if manifest.get("status") == "failed":
                error, step = manifest.get("error"), manifest.get("step")
    if error is None and code == 2:  # a config error the ranks found: rank 0 printed it
        return f"omni-train: stage {cfg.stage.name} did not start: see the error above"
    ranks = sorted(
        int(p.stem.split("_")[1]) for p in logs.glob("rank_*.error") if p.stat().st_mtime >= started
    )
    cause = None if ranks or report is None else _root_cause(Path(report))
    if error is None:
        if ranks:
            error = f"rank {ranks[0]}: {error_path(out, ranks[0]).read_text().strip()}"
        elif cause is not None:
            error = f"rank {cause[0]} exited with code {cause[1]} without saying why (killed?)"
        else:
            error = f"a rank exited with code {code} without saying why (killed?)"
        with contextlib.suppress(OSError):
            mark_failed(out, error, stage=cfg.stage.name)
    if ranks:
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
    else:
        who = f"rank {cause[0]}" if cause is not None else "a rank"
    total = cfg.trainer.train_steps
    when = ""
    if step is not None:  # the manifest's step is the last one completed
        when = (f" after step {step}/{total}" if str(error).startswith("after step")
                else f" in step {step + 1}/{total}")  # fmt: skip
    first = ranks[0] if ranks else cause[0] if cause is not None else None
    log = rank_log_path(out, first) if first is not None else logs / "rank_*.log"
    where = f"omni-train: {who} failed{when}; its log: {log}"
    if report is not None:
        where += f"; torchrun's own report: {report}"
    return (
        f"{where}\n"
        f"omni-train: stage {cfg.stage.name} failed: {error}. Tracebacks: {logs}/rank_*.log; "
        f"manifest: {out / 'manifest.json'}"
    )


def _root_cause(report: Path) -> tuple[int, int] | None:
    """(rank, exit code) of the first failure torchrun observed, from the failure table of
    its last run in the report (appended to: a run starts with a ``----`` line); None without
    one."""
    with contextlib.suppress(OSError):
        text = report.read_text(encoding="utf-8", errors="replace").rsplit("\n---- ", 1)[-1]
        table = text.rsplit("Root Cause", 1)[1] if "Root Cause" in text else ""
        found = re.search(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", table, re.DOTALL)
        if found:
            return int(found.group(1)), int(found.group(2))
    return None
