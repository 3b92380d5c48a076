"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Synthetic energon datasets of every category (16 samples each), made once per worker."""
    from omni_train.data.prepare import synthesize

    root = tmp_path_factory.mktemp("synth_root")
    synthesize(root, 16, seed=0)
    return root
