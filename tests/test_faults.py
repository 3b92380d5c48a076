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
import shutil
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
from omni_train.lifecycle import EXIT_INTERRUPTED
from omni_train.stage.launch import children, preflight, torchrun

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


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc``)."""
    out = [pid]
    for child in children(pid):
        out += _tree(child)
    return out


def test_one_run_per_folder_and_killing_the_launcher_leaves_no_process(tmp_path):
    """A running stage holds its folder from its launcher on: a second run there is refused
    by its launcher in seconds, naming the holder. Then the launcher dies by SIGKILL (no
    handler runs) at a random moment of a run that saves every step: torchrun, both ranks and
    everything they started (checkpoint writers, resource trackers, the group reapers) follow
    within 10 s."""
    seed = int(os.environ.get("OMNI_TRAIN_FAULT_SEED", time.time_ns() % 10_000))
    out = tmp_path / "out"
    run = Run(out, *SMOKE, "trainer.train_steps=100000", "trainer.save_interval=1")
    run.wait_for(r"saved .*step_0000002")
    holder = json.loads((out / LOCK).read_text())
    assert holder["pid"] == run.proc.pid  # the launcher holds it, not a rank
    start = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "omni_train.cli", "run", "--no-plan", "--nproc-per-node", "2",
         *SMOKE, f"checkpoint.output_dir={out}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    refused_in = time.monotonic() - start
    assert second.returncode == 2
    assert f"host {socket.gethostname()}, pid {holder['pid']}" in second.stderr
    assert "in use by another run" in second.stderr and "Traceback" not in second.stderr
    assert "torch.distributed" not in second.stderr and refused_in < 20  # no rank started

    time.sleep(random.Random(seed).uniform(0, 3))  # saves included: one per step
    tree = _tree(run.proc.pid)
    assert len(tree) >= 6, tree  # launcher, torchrun, 2 ranks, their reapers (and helpers)
    run.proc.kill()
    run.wait()
    assert not (alive := _alive_after(tree, 10)), f"seed {seed}: still running: {alive}"


@pytest.mark.slow
def test_ctrl_c_stops_with_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    run = Run(out, *SMOKE, "trainer.train_steps=100000")
    run.wait_for(r"step 2/")
    run.proc.send_signal(signal.SIGINT)  # Ctrl-C: the same graceful stop as SIGTERM
    assert run.wait() == EXIT_INTERRUPTED
    assert manifest(out)["stop_reason"] == "signal SIGINT"


def _alive_after(pids: list[int], seconds: float) -> list[int]:
    """The processes of ``pids`` still running (zombies aside) after waiting up to ``seconds``
    for them to go."""
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
    return alive


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return False


_TWICE = """
import os, signal, sys, time
from omni_train.lifecycle import StopRequest
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
    with pytest.raises(ValueError, match=r"[kMGT]?B free but one checkpoint of this stage takes "
                       r"about [\d.]+ GB"):  # fmt: skip
        preflight(big, 1)
    with pytest.raises(ValueError, match="not a torch_dist checkpoint|no manifest|neither"):
        preflight(_cfg(f"checkpoint.output_dir={tmp_path / 'a'}",
                       f"checkpoint.init_from={tmp_path / 'missing'}"), 2)  # fmt: skip
    resumable = tmp_path / "r"
    (resumable / "checkpoints" / "step_0000002").mkdir(parents=True)
    for name in (".metadata", "metadata.json"):  # complete, from before integrity records
        (resumable / "checkpoints" / "step_0000002" / name).write_text("{}")
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
        torchrun(2, probe, "enospc", "4", *stage, f"checkpoint.output_dir={out}", timeout=300)
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


# ---- checkpoints that cannot be trusted, schedules that changed, disks that fill up -----------


def _run_cli(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``omni-train run`` (the launcher) to its end."""
    cmd = [sys.executable, "-m", "omni_train.cli", "run", "--no-plan", "--nproc-per-node", "2"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([*cmd, *overrides, f"checkpoint.output_dir={out}"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


SIX = [*SMOKE, "trainer.train_steps=6", "trainer.save_interval=2"]


def test_a_damaged_or_unnamed_checkpoint_resumes_from_the_newest_intact_one(tmp_path):
    """The newest checkpoint cut in half and ``latest`` deleted: ``resume=strict`` stops in
    one line naming it, before any rank starts; ``auto`` says so, sets it aside and resumes
    from the one before, and ends exactly where an uninterrupted run ends."""
    whole = launch(2, tmp_path / "whole", *SIX)
    out = tmp_path / "run"
    launch(2, out, *SIX)
    damaged = out / "checkpoints" / "step_0000006" / "__1_0.distcp"
    os.truncate(damaged, damaged.stat().st_size // 2)
    (out / "checkpoints" / "latest").unlink()

    start = time.monotonic()
    strict = _run_cli(out, *SIX, "checkpoint.resume=strict")
    assert strict.returncode == 2 and time.monotonic() - start < 20
    assert (
        "checkpoint " + str(out / "checkpoints" / "step_0000006") + " is damaged" in strict.stderr
    )
    assert "Traceback" not in strict.stderr and strict.stderr.count("omni-train: error") == 1

    auto = _run_cli(out, *SIX)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "step_0000006 is damaged (__1_0.distcp is" in auto.stderr
    done = manifest(out)
    assert done["status"] == "completed" and done["resumed_from"].endswith("step_0000004")
    assert done["losses"] == whole["losses"] and done["grad_norms"] == whole["grad_norms"]
    assert done["data"] == whole["data"]
    count, differing = differing_weights(tmp_path / "whole", out)
    assert count > 10 and differing == []
    assert (out / "checkpoints" / "damaged-step_0000006" / "__1_0.distcp").is_file()


def test_a_resume_with_more_steps_is_refused_or_keeps_or_rescales_the_schedule(tmp_path):
    out = tmp_path / "run"
    launch(2, out, *SIX)
    eight = [*SMOKE, "trainer.train_steps=8", "trainer.save_interval=2"]
    refused = _run_cli(out, *eight)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "different schedule (train_steps 6 -> 8, lr_decay_steps 6 -> 8)" in refused.stderr
    shutil.copytree(out, tmp_path / "keep")
    kept = _run_cli(tmp_path / "keep", *eight, "checkpoint.on_schedule_change=keep")
    rescaled = _run_cli(out, *eight, "checkpoint.on_schedule_change=rescale")
    assert kept.returncode == 0 and rescaled.returncode == 0, rescaled.stderr[-3000:]
    lr = lambda m: [x["train/lr/group0"] for x in m["metrics"]]  # noqa: E731
    keep, rescale = manifest(tmp_path / "keep"), manifest(out)
    assert keep["step"] == rescale["step"] == 8
    min_lr = keep["schedule"]["min_lr"]
    assert lr(keep)[6:] == [min_lr, min_lr]  # the 6-step schedule had ended
    assert all(x > min_lr for x in lr(rescale)[6:])  # the 8-step cosine goes on
    assert keep["schedule"]["lr_decay_steps"] == 6 and rescale["schedule"]["lr_decay_steps"] == 8


def test_a_save_the_disk_cannot_hold_is_refused_before_a_byte_is_written(tmp_path):
    """Before each save the ranks count the bytes of the sharded state and check the free
    space; before the first step, room for one checkpoint of this model and layout."""
    probe = str(Path(__file__).with_name("enospc_probe.py"))
    out = tmp_path / "out"
    stage = [*SMOKE, "trainer.train_steps=4", "trainer.save_interval=2"]
    with pytest.raises(RuntimeError, match="not enough space for the checkpoint step_0000004"):
        torchrun(2, probe, "nospace", "4", *stage, f"checkpoint.output_dir={out}", timeout=300)
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
    assert not (out / "checkpoints" / "step_0000004").exists()
    failed = manifest(out)
    assert failed["status"] == "failed" and "the previous checkpoint is intact" in failed["error"]
    assert re.search(r"takes about [\d.]+ MB and .* has 1.00 MB free", failed["error"])
    assert failed["checkpoint"].endswith("step_0000002")
    # what a save wrote never exceeds what the check asked for
    from omni_train.checkpoint.integrity import read_record
    from omni_train.checkpoint.io import space_needed

    record = read_record(out / "checkpoints" / "step_0000002")
    assert record["bytes"] <= space_needed(record["payload_bytes"], record["payload_entries"])
    with pytest.raises(RuntimeError) as e:
        torchrun(2, probe, "startup", "0", *stage, f"checkpoint.output_dir={tmp_path / 'b'}",
                 timeout=300)  # fmt: skip
    assert str(e.value).count("omni-train: error: not enough space for one checkpoint") == 1
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_unusable_data_fails_in_one_line_and_a_stop_while_waiting_ends_in_seconds(tmp_path):
    """Every sample undecodable: the skip guard fires although no step completes, and the
    launcher's last line says why. With the guard off the stage waits for data forever: a
    SIGTERM ends it ``interrupted`` within seconds, its data workers and helpers with it."""
    data = fault_corpus.write_unusable(tmp_path / "data")
    stage = [
        "stage=smoke_omni", "model=tiny", "parallel=single", f"data.path={data}",
        "data.blend=null", "data.synthetic_root=null", "data.num_workers=1",
        "data.packing.enabled=false", "trainer.seq_length=512", "trainer.micro_batch_size=1",
        "trainer.global_batch_size=2", "trainer.train_steps=4", "trainer.eval_iters=0",
    ]  # fmt: skip
    failed = _run_cli(tmp_path / "a", *stage)
    assert failed.returncode == 1
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("omni-train: stage smoke_omni failed: the last 200 samples"), last
    assert "{'undecodable_image': 200}" in last and "rank_*.log" in last
    assert manifest(tmp_path / "a")["status"] == "failed"

    run = Run(tmp_path / "b", *stage, "data.max_skip_fraction=1.0")  # the guard off
    run.wait_for(r"skipping sample", timeout=300)
    time.sleep(2)
    tree = _tree(run.proc.pid)
    start = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(60) == EXIT_INTERRUPTED
    assert time.monotonic() - start < 15
    stopped = manifest(tmp_path / "b")
    assert stopped["status"] == "interrupted"
    assert stopped["stop_reason"] == "signal SIGTERM (while waiting for data)"
    assert not (alive := _alive_after(tree, 10)), f"still running: {alive}"
