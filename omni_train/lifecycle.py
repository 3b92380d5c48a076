"""How a stage's processes stop: on a signal with a checkpoint, with their launcher, never as
orphans.

**Signals** (each rank): SIGTERM (Slurm at the time limit or on preemption, ``kill``), SIGINT
(Ctrl-C) and SIGUSR1 (Slurm's ``--signal`` warning) ask for a stop. The rank finishes the step
it is in; after every step the ranks agree (an all-reduce) whether any of them was asked, so all
stop after the same step, save a checkpoint there and mark the manifest ``interrupted`` with the
signal's name; the processes exit with :data:`EXIT_INTERRUPTED`, and resubmitting the same
command resumes bit-identically. A second signal at least :data:`REPEAT_S` seconds after the
first exits at once (``128 + signal``): a repeat within that window is the same request arriving
twice (the terminal signals the whole process group and a launcher forwards it again).

**Parent death** (each rank and the launcher's torchrun): the kernel kills the process when
its parent dies (``PR_SET_PDEATHSIG``, Linux), so killing the launcher (even ``kill -9``) takes
its torchrun and ranks with it instead of leaving them training, and saving, as orphans; and
what a rank started dies with the rank (:func:`start_group_reaper`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

from omni_train.log import get_logger

log = get_logger()

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped with a checkpoint; run the same command to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_S = 1.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; a no-op
    elsewhere). Also usable as a ``preexec_fn``."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # best effort: an unusual libc; the launcher's own handling still applies
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


_REAPER = """
import os, signal, sys, time
pgid, parent = int(sys.argv[1]), int(sys.argv[2])
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # a job-wide stop signal is the rank's to handle
while os.getppid() == parent:
    time.sleep(0.5)
os.killpg(pgid, signal.SIGKILL)
"""


def start_group_reaper() -> int | None:
    """When this rank dies, however it dies, kill every process it started: megatron's
    checkpoint writer children, multiprocessing's resource tracker, data-loader workers. They
    share the rank's process group (torchrun starts each rank in a session of its own), but
    ``PR_SET_PDEATHSIG`` reaches only direct children, and the writers block the stop signals.
    A small watcher process in the group polls its parent and, once the rank is gone, kills
    the group (itself included). Only where this rank leads its process group (under
    torchrun); elsewhere (a shell's job, srun) the group is not ours to kill. Returns the
    watcher's pid, or None."""
    import subprocess

    if not sys.platform.startswith("linux") or os.getpgid(0) != os.getpid():
        return None
    proc = subprocess.Popen(
        [sys.executable, "-S", "-c", _REAPER, str(os.getpid()), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        close_fds=True,
    )
    return proc.pid


class StopRequest:
    """The stop signals of this process: :meth:`install` once, then :meth:`agreed` after each
    step (collective) returns the reason to stop, or None; :meth:`pending` says at once, for
    code that waits (the data stream polls it while it waits for a micro-batch)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._first = 0.0

    def pending(self) -> str | None:
        """This process's stop reason so far (no collective)."""
        return self.reason

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.reason is None:
            self.reason = f"signal {name}"
            self._first = now
            log.warning("%s: stopping after this step with a checkpoint", name)
        elif now - self._first >= REPEAT_S:
            log.warning("%s again: exiting now, without a checkpoint", name)
            os._exit(128 + signum)

    def agreed(self, device) -> str | None:
        """Whether any rank was asked to stop (an all-reduce over the world); the reason."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.reason else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.reason is None:
            self.reason = "signal (another rank)"
        return self.reason if flag.item() else None
