"""``python -m omni_train.quiet MODULE ARGS...``: run ``MODULE`` as ``__main__`` with the
filters of :data:`omni_train.log.QUIET` installed first.

The tools the front door starts in a process of their own (the planner, the dry run, the model
summary, the answer probe) import megatron-core at their top, and megatron warns while it is
imported: a filter their ``main()`` installs would come too late. Starting them through this
module keeps their imports at the top and their console quiet (``--verbose``: everything).
A ``ValueError`` (bad input: a config, a checkpoint of another model) ends the tool with one
line and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import os
import runpy
import sys

from omni_train.log import install_filters

# the front door's command of each tool module (for its error line)
_COMMANDS = {
    "omni_train.inference.evaluate": "eval",
    "omni_train.inference.generate": "generate",
    "omni_train.stage.probe": "probe",
    "omni_train.plan.planner": "plan",
    "omni_train.plan.dry_run": "run --dry-run",
    "omni_train.plan.summary": "model summary",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m omni_train.quiet MODULE [ARGS...]")
    install_filters()
    sys.argv = argv  # the module's argv: runpy sets argv[0] to its path
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except ValueError as e:  # bad input (a config, a checkpoint of another model): one line
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the same error
            name = _COMMANDS.get(argv[0], argv[0])
            print(f"omni-train {name}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
