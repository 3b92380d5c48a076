"""torchrun with its own output in a file: ``python -m omni_train.stage.agent REPORT ARGS...``
runs ``torch.distributed.run`` with ``ARGS`` in this process, and what torchrun itself says (its
log lines, its ``ChildFailedError`` traceback and failure table) goes to ``REPORT``
(``<output_dir>/logs/torchrun.log``), while the ranks' own output streams to the console.

Only Python's ``sys.stderr`` is redirected, before torch is imported (torch's log handlers bind
the stream they are created with); file descriptor 2, which the ranks inherit, stays the
console. A failure's summary is the launcher's (:func:`omni_train.stage.launch.failure_summary`);
``omni-train --verbose`` runs torchrun without this wrapper.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    report, args = Path(argv[0]), argv[1:]
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        out = report.open("a", encoding="utf-8", buffering=1)
    except OSError as e:  # torchrun says its piece on the console, as without this wrapper
        print(f"omni-train: torchrun's report cannot go to {report} ({e}); on stderr instead",
              file=sys.stderr)  # fmt: skip
        out = sys.stderr
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"---- {stamp} {socket.gethostname()} pid {os.getpid()}: torchrun {' '.join(args)}",
          file=out)  # fmt: skip
    sys.stderr = out
    # Imported only now: torch's loggers take the sys.stderr of the moment they are created.
    from torch.distributed.run import main as torchrun

    try:
        torchrun(args)
    except Exception:  # ChildFailedError (a rank failed), a signal torchrun handles: exit 1,
        traceback.print_exc(file=out)  # as torchrun's uncaught exception does
        return 1
    finally:
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
