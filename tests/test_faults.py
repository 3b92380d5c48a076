"""Nothing lost: signals stop a stage with a checkpoint and the resume is bit-identical; the
launcher's death takes its ranks along; one run per output folder; data tools never destroy
data; bad input is skipped and counted, never a crash; errors show before anything starts.

The processes are real: ``omni-train run`` (the launcher users run), torchrun, 2 ranks; the
signals are sent with ``os.kill``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import fault_corpus
import pytest
from launch import differing_weights, launch

from omni_train.checkpoint.lock import LOCK, LockedError, OutputLock, check_unlocked
from omni_train.config import compose_job
from omni_train.stage.launch import children, preflight, torchrun
from omni_train.stage.lifecycle import EXIT_INTERRUPTED

pytestmark = pytest.mark.distributed

SMOKE = [
    "stage=smoke",
    "model=tiny",
    "parallel=tp2",
    "trainer.precision=fp32",
    "trainer.save_interval=0",
    "trainer.eval_iters=1",
]


class Run:
    """``omni-train run --nproc-per-node 2`` in the background; its output lines collected."""

    def __init__(self, out: Path, *overrides: str):
        cmd = [sys.executable, "-m", "omni_train.cli", "run", "--nproc-per-node", "2"]
        cmd += [*overrides, f"checkpoint.output_dir={out}"]
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not seen:\n{''.join(self.lines[-40:])}")

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def output(self) -> str:
        return "".join(self.lines)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _stop_and_resume(tmp_path: Path, stage: list[str], steps: int, sig: int) -> None:
    """Stop a run with ``sig`` at a random step, resume it, compare with an uninterrupted run:
    losses, grad norms, data position and every weight identical."""
    seed = int(os.environ.get("OMNI_TRAIN_FAULT_SEED", time.time_ns() % 10_000))
    at = random.Random(seed).randint(2, steps - 4)
    whole = launch(2, tmp_path / "whole", *stage)

    cut = Run(tmp_path / "cut", *stage)
    cut.wait_for(rf"step {at}/{steps} ")
    cut.proc.send_signal(sig)
    assert cut.wait() == EXIT_INTERRUPTED, f"seed {seed}\n{cut.output()[-3000:]}"
    stopped = manifest(tmp_path / "cut")
    name = signal.Signals(sig).name
    assert stopped["status"] == "interrupted" and stopped["stop_reason"] == f"signal {name}"
    assert at <= stopped["step"] < steps, f"seed {seed}: stopped at {stopped['step']}"
    assert stopped["checkpoint"].endswith(f"step_{stopped['step']:07d}")
    assert not (tmp_path / "cut" / LOCK).exists()  # released

    resumed = Run(tmp_path / "cut", *stage)
    assert resumed.wait() == 0, resumed.output()[-3000:]
    done = manifest(tmp_path / "cut")
    assert done["status"] == "completed" and done["resumed_from"] == stopped["checkpoint"]
    assert done["losses"] == whole["losses"], f"seed {seed}"
    assert done["grad_norms"] == whole["grad_norms"]
    assert done["data"] == whole["data"] and done["tokens"] == whole["tokens"]
    count, differing = differing_weights(tmp_path / "whole", tmp_path / "cut")
    assert count > 10 and differing == [], f"seed {seed}"


def test_sigterm_at_a_random_step_checkpoints_there_and_resumes_bit_identically(
    tmp_path, synth_root
):
    """The omni model on packed energon data, 2 data-parallel ranks, bf16: what must survive
    is the sharded optimizer state with its fp32 main parameters and each rank's loader state
    (the stop falls in the middle of the packer's buffer)."""
    steps = 8
    stage = [
        "stage=smoke_omni",
        "model=tiny",
        "parallel=single",  # DP=2, distributed optimizer
        "trainer.precision=bf16",
        f"data.synthetic_root={synth_root}",
        "data.packing.enabled=true",
        "data.packing.buffer_size=24",
        "trainer.micro_batch_size=1",
        "trainer.global_batch_size=2",
        f"trainer.train_steps={steps}",
        "trainer.save_interval=0",
        "trainer.eval_iters=1",
    ]
    _stop_and_resume(tmp_path, stage, steps, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_slurm_warning_at_tp2_resumes_bit_identically(tmp_path, sig):
    """The longer variant: TP=2 (sharded weights and optimizer state), 24 steps."""
    steps = 24
    _stop_and_resume(tmp_path, [*SMOKE, f"trainer.train_steps={steps}"], steps, sig)


def test_one_run_per_folder_and_killing_the_launcher_kills_every_rank_within_10_s(tmp_path):
    """A running stage holds its folder: a second run there is refused, naming the holder.
    Then the launcher dies by SIGKILL (no handler runs): torchrun and both ranks follow."""
    out = tmp_path / "out"
    run = Run(out, *SMOKE, "trainer.train_steps=100000")
    run.wait_for(r"step 2/")
    holder = json.loads((out / LOCK).read_text())
    second = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "run", "--nproc-per-node", "2", *SMOKE,
         f"checkpoint.output_dir={out}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 2
    assert f"host {socket.gethostname()}, pid {holder['pid']}" in second.stderr
    assert "in use by another run" in second.stderr and "Traceback" not in second.stderr

    torchrun_pids = children(run.proc.pid)
    ranks = [p for t in torchrun_pids for p in children(t)]
    assert len(torchrun_pids) == 1 and len(ranks) == 2
    run.proc.kill()
    run.wait()
    deadline = time.monotonic() + 10
    alive = [p for p in torchrun_pids + ranks if Path(f"/proc/{p}").exists()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
    assert not alive, f"still running: {alive}"


@pytest.mark.slow
def test_ctrl_c_stops_with_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    run = Run(out, *SMOKE, "trainer.train_steps=100000")
    run.wait_for(r"step 2/")
    run.proc.send_signal(signal.SIGINT)  # Ctrl-C: the same graceful stop as SIGTERM
    assert run.wait() == EXIT_INTERRUPTED
    assert manifest(out)["stop_reason"] == "signal SIGINT"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return False


_TWICE = """
import os, signal, sys, time
from omni_train.stage.lifecycle import StopRequest
stop = StopRequest().install()
print("ready", flush=True)
while True:
    time.sleep(0.05)
    if stop.reason and sys.argv[1] == "once":
        print("asked:", stop.reason, flush=True)
        sys.exit(0)
"""


@pytest.mark.parametrize("how", ["once", "twice"])
def test_a_second_signal_exits_at_once_a_repeat_within_a_second_does_not(how):
    proc = subprocess.Popen(
        [sys.executable, "-c", _TWICE, "once" if how == "once" else "wait"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # the same request twice (a launcher forwarding it)
    if how == "once":
        assert proc.wait(10) == 0 and "asked: signal SIGTERM" in proc.stdout.read()
        return
    time.sleep(1.5)
    assert proc.poll() is None  # still stopping gracefully
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM


# ---- the lock ----------------------------------------------------------------------------------


def test_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path, monkeypatch):
    a = OutputLock(tmp_path).acquire()
    with pytest.raises(LockedError, match=rf"pid {os.getpid()}"):
        OutputLock(tmp_path).acquire()
    with pytest.raises(LockedError):
        check_unlocked(tmp_path)
    a.release()
    assert not (tmp_path / LOCK).exists()
    # a holder on this host whose process is gone
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}
    (tmp_path / LOCK).write_text(json.dumps(record))
    check_unlocked(tmp_path)  # stale: no error
    b = OutputLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == b.token
    b.release()
    # a holder on another host: stale only once its heartbeat is old
    (tmp_path / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    with pytest.raises(LockedError, match="host elsewhere"):
        OutputLock(tmp_path).acquire()
    monkeypatch.setenv("OMNI_TRAIN_LOCK_STALE_S", "60")
    old = time.time() - 120
    os.utime(tmp_path / LOCK, (old, old))
    OutputLock(tmp_path).acquire().release()


# ---- pre-flight: errors before any process starts -----------------------------------------------


def _cfg(*overrides: str):
    return compose_job([*SMOKE, *overrides])


def test_preflight_refuses_unwritable_full_or_mismatched_output_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot be written"):
        preflight(_cfg(f"checkpoint.output_dir={tmp_path / 'file' / 'run'}"), 2)
    # one checkpoint of the released model (weights + AdamW state) does not fit this disk
    big = _cfg("model=nano_omni_30b_a3b", "parallel=single", f"checkpoint.output_dir={tmp_path}")
    with pytest.raises(ValueError, match=r"GB free but one checkpoint of this stage takes about"):
        preflight(big, 1)
    with pytest.raises(ValueError, match="not a torch_dist checkpoint|no manifest|neither"):
        preflight(_cfg(f"checkpoint.output_dir={tmp_path / 'a'}",
                       f"checkpoint.init_from={tmp_path / 'missing'}"), 2)  # fmt: skip
    resumable = tmp_path / "r"
    (resumable / "checkpoints" / "step_0000002").mkdir(parents=True)
    (resumable / "checkpoints" / "latest").write_text("step_0000002")
    (resumable / "manifest.json").write_text(json.dumps({"layout": {"world": 4}}))
    with pytest.raises(ValueError, match="written by 4 ranks, this job has 2"):
        preflight(_cfg(f"checkpoint.output_dir={resumable}"), 2)


def test_launcher_errors_are_one_line_before_torchrun_starts(tmp_path):
    (tmp_path / "file").write_text("x")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "run", "--nproc-per-node", "2", *SMOKE,
         f"checkpoint.output_dir={tmp_path / 'file' / 'x'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "cannot be written" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("omni-train: error") == 1
    assert time.monotonic() - start < 20  # no rank was started


def test_an_error_inside_the_ranks_is_printed_once(tmp_path):
    with pytest.raises(RuntimeError) as e:
        torchrun(2, "-m", "omni_train.train", *SMOKE, f"checkpoint.output_dir={tmp_path}",
                 f"checkpoint.init_from={tmp_path / 'missing'}", timeout=300)  # fmt: skip
    assert str(e.value).count("omni-train: error:") == 1


def test_a_full_disk_during_a_save_leaves_the_previous_checkpoint_to_resume(tmp_path):
    out = tmp_path / "out"
    # saves at 2 and 4: the one that fails is the stage's final save, after the training loop
    stage = [*SMOKE, "trainer.train_steps=4", "trainer.save_interval=2"]
    probe = str(Path(__file__).with_name("enospc_probe.py"))
    with pytest.raises(RuntimeError, match="No space left on device"):
        torchrun(2, probe, "4", *stage, f"checkpoint.output_dir={out}", timeout=300)
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
    assert not (out / "checkpoints" / "step_0000004").exists()  # the partial write is gone
    failed = manifest(out)
    assert failed["status"] == "failed" and "No space left on device" in failed["error"]
    assert failed["error"].startswith("after step 4 (final evaluation or checkpoint)")
    done = launch(2, out, *stage)
    assert done["status"] == "completed" and done["resumed_from"].endswith("step_0000002")


# ---- data tools ---------------------------------------------------------------------------------


def _convert(jsonl: Path, media: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "data", "convert", str(jsonl), "--media",
         str(media), "--out", str(out), "--val-fraction", "0", *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_convert_never_deletes_what_it_did_not_write(tmp_path):
    jsonl, media, _ = fault_corpus.write(tmp_path / "corpus")
    media_files = sorted(p.name for p in media.iterdir())
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for target, flags in ((precious, ()), (precious, ("--overwrite",)), (media, ("--overwrite",))):
        proc = _convert(jsonl, media, target, *flags)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in media.iterdir()) == media_files
    ds = tmp_path / "ds"
    assert _convert(jsonl, media, ds).returncode == 0
    first = sorted(p.name for p in ds.iterdir())
    proc = _convert(jsonl, media, ds)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    # a conversion that fails (no row converts) leaves the previous dataset as it was
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    proc = _convert(bad, media, ds, "--overwrite")
    assert proc.returncode != 0 and sorted(p.name for p in ds.iterdir()) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]  # no leftovers
    assert _convert(jsonl, media, ds, "--overwrite").returncode == 0


def test_bad_input_is_counted_by_reason_and_no_good_sample_is_lost(tmp_path):
    """The corpus: every convert reason once (twice for paths outside --media), GIF/WebP
    images, a 0.01 s clip; a 2-rank stage with no validation split and no evaluation."""
    from omni_train.datatools.convert import convert as convert_jsonl

    jsonl, media, expected = fault_corpus.write(tmp_path / "corpus")
    counts = convert_jsonl(jsonl, media, tmp_path / "ds", val_fraction=0.0)
    assert counts == {
        "converted": expected["converted"],
        "train": expected["converted"],
        "val": 0,
        "skipped": expected["skipped"],
    }
    good = len(expected["good"])
    m = launch(
        2,
        tmp_path / "run",
        "stage=smoke_omni",
        "model=tiny",
        "parallel=single",  # 2 data-parallel ranks
        f"data.path={tmp_path / 'ds'}",
        "data.blend=null",
        "data.synthetic_root=null",
        "data.num_workers=0",
        "data.shuffle_buffer_size=0",
        "data.max_samples_per_sequence=0",
        "data.packing.enabled=false",
        "data.max_skip_fraction=0.5",
        "trainer.seq_length=512",
        "trainer.micro_batch_size=1",
        "trainer.global_batch_size=2",
        f"trainer.train_steps={good // 2}",  # one pass over the good samples
        "trainer.eval_iters=0",  # with --val-fraction 0: nothing to evaluate, no crash
    )
    assert m["status"] == "completed"
    assert m["data"]["skipped"] == expected["planning"]
    assert m["data"]["num_samples"] == good
    assert m["data"]["num_read"] == expected["converted"]
