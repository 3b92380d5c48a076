"""A stage that runs out of disk space (run under torchrun by tests/test_faults.py):

* ``enospc STEP``: megatron's ``dist_checkpointing.save`` of step STEP writes part of the
  checkpoint, then fails with ENOSPC, as a full filesystem would;
* ``nospace STEP``: the disk reports almost no free space when step STEP is to be saved (the
  save must refuse before writing);
* ``startup 0``: the disk reports almost no free space from the start (the stage must refuse
  before its first step).

Usage: torchrun --nproc-per-node N tests/enospc_probe.py MODE STEP [overrides]
"""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path

from omni_train.checkpoint import io


def main(mode: str, fail_at: str, *overrides: str) -> int:
    step = f"step_{int(fail_at):07d}"
    if mode == "enospc":
        save = io.dist_checkpointing.save

        def full_disk(sharded, path, *args, **kwargs):
            if Path(path).name == step:
                (Path(path) / "__partial.distcp").write_bytes(b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return save(sharded, path, *args, **kwargs)

        io.dist_checkpointing.save = full_disk
    else:
        usage = shutil.disk_usage

        def nearly_full(path):
            real = usage(path)
            if mode == "startup" or Path(path).name == step:
                return type(real)(real.total, real.total - 1_000_000, 1_000_000)
            return real

        io.shutil.disk_usage = nearly_full
    from omni_train.train import main as train

    return train(list(overrides))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
