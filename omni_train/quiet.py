"""``python -m omni_train.quiet MODULE ARGS...``: run ``MODULE`` as ``__main__`` with the
filters of :data:`omni_train.log.QUIET` installed first.

The tools the front door starts in a process of their own (the planner, the dry run, the model
summary, the answer probe) import megatron-core at their top, and megatron warns while it is
imported: a filter their ``main()`` installs would come too late. Starting them through this
module keeps their imports at the top and their console quiet (``--verbose``: everything).
"""

from __future__ import annotations

import runpy
import sys

from omni_train.log import install_filters


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m omni_train.quiet MODULE [ARGS...]")
    install_filters()
    sys.argv = argv  # the module's argv: runpy sets argv[0] to its path
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
