"""A stage whose checkpoint write runs out of disk space at one step (run under torchrun by
tests/test_faults.py): megatron's ``dist_checkpointing.save`` writes part of the checkpoint,
then fails with ENOSPC, as a full filesystem would.

Usage: torchrun --nproc-per-node N tests/enospc_probe.py FAIL_AT_STEP [overrides]
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from omni_train.checkpoint import io


def main(fail_at: str, *overrides: str) -> int:
    save = io.dist_checkpointing.save

    def full_disk(sharded, path, *args, **kwargs):
        if Path(path).name == f"step_{int(fail_at):07d}":
            (Path(path) / "__partial.distcp").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(sharded, path, *args, **kwargs)

    io.dist_checkpointing.save = full_disk
    from omni_train.train import main as train

    return train(list(overrides))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
