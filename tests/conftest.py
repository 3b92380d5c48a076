"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite tests the CPU platform, also on a GPU host: every process it starts (torchrun ranks
# included) inherits these. Tests of the GPU-side choice fake CUDA in a child process.
os.environ["OMNI_TRAIN_PLATFORM"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""


def pytest_configure(config) -> None:
    """``--dist loadgroup`` must keep each ``xdist_group`` on one worker, or every worker re-runs
    the expensive module fixtures the group exists to share. pytest 9.2 changed how node ids
    are stored and pytest-xdist 3.8 then silently stops grouping: refuse that pair."""
    if config.getoption("dist", "no") == "loadgroup":
        version = tuple(int(p) for p in pytest.__version__.split(".")[:2])
        if version >= (9, 2):
            raise pytest.UsageError(
                f"pytest {pytest.__version__} with pytest-xdist drops xdist_group under --dist "
                "loadgroup; install the pinned pytest (make setup)"
            )


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Synthetic energon datasets of every category (16 samples each), made once per worker."""
    from omni_train.datatools.prepare import synthesize

    root = tmp_path_factory.mktemp("synth_root")
    synthesize(root, 16, seed=0)
    return root
