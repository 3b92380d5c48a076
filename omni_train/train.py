"""Entry point for one stage under torchrun (or Slurm's srun):

    torchrun --nproc-per-node 2 -m omni_train.train stage=smoke model=tiny parallel=tp2

Arguments are Hydra overrides of the recipe tree in ``recipes/``.
"""

from __future__ import annotations

import sys

from omni_train.config import compose_job
from omni_train.stage.runner import run_stage


def main(argv: list[str] | None = None) -> int:
    overrides = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose_job(overrides)
        run_stage(cfg)
    except ValueError as e:  # config errors: one clear line, no traceback
        print(f"omni-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
