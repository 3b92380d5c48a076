"""Entry point for one stage under torchrun (or Slurm's srun):

    torchrun --nproc-per-node 2 -m omni_train.train stage=smoke model=tiny parallel=tp2

Arguments are Hydra overrides of the recipe tree in ``recipes/``. Exit codes: 0 completed (or
stopped by ``trainer.exit_after_steps``), 2 a config error (printed once, by rank 0),
:data:`~omni_train.lifecycle.EXIT_INTERRUPTED` stopped by a signal with a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import sys

from omni_train.config import compose_job
from omni_train.lifecycle import EXIT_INTERRUPTED, die_with_parent, start_group_reaper
from omni_train.log import error_path, install_filters, rank_log_path


def main(argv: list[str] | None = None) -> int:
    install_filters()  # before megatron and NeMo are imported: they warn as they import
    # lazy: megatron's checkpoint writer starts a helper process with the "spawn" method, which
    # re-imports this (__main__) module; a light module keeps each rank's first save from
    # paying megatron's import (~7 s of CPU) once more, and the filters above come first.
    from omni_train.stage.runner import StageError, run_stage

    overrides = sys.argv[1:] if argv is None else argv
    die_with_parent()  # a rank never outlives its launcher (torchrun)
    start_group_reaper()  # nothing the rank starts outlives the rank
    try:
        cfg = compose_job(overrides)
        manifest = run_stage(cfg)
    except StageError as e:  # the traceback is in this rank's log; the manifest says failed
        rank = os.environ.get("RANK", "0")
        if not e.everywhere or rank == "0":
            who = "" if e.everywhere else f"rank {rank}: "
            where = f" (traceback: {rank_log_path(cfg.checkpoint.output_dir)})"
            print(f"omni-train: {who}stage failed: {e}{where}", file=sys.stderr)
        # for the launcher, which marks the manifest when rank 0 could not (it died, or hung)
        with contextlib.suppress(OSError):
            error_path(cfg.checkpoint.output_dir, rank).write_text(f"{e}\n")
        return 1
    except ValueError as e:  # config errors (identical on every rank): one line, from rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"omni-train: error: {e}", file=sys.stderr)
        return 2
    reason = str(manifest.get("stop_reason"))
    if reason.endswith("(while waiting for data)"):
        # The data workers may be stuck or busy (every sample unusable): leave without waiting
        # for their orderly shutdown; the group reaper ends them with this process.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED if reason.startswith("signal") else 0


if __name__ == "__main__":
    sys.exit(main())
