"""A model built on the meta device: parameter names and global shapes, no weight memory.

The inspection tools (``omni-train model summary``, the dry run) and the Hugging Face
conversion build models this way; the training runtime never does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from omni_train.model.build import build_omni_model
from omni_train.model.specs import platform_leaves
from omni_train.parallel.state import local_world
from omni_train.platform import setup


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block moves to the meta device at once.

    Weights are created by ``torch.empty`` (untouched pages) and replaced before anything
    writes them; code that needs real scalars during construction (NeMo computes lengths
    with ``.item()``) still works, which a global meta-device context would break.
    """
    original = torch.nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_on_meta(cfg) -> torch.nn.Module:
    """The model of ``cfg`` (TP=1) on the meta device, in a world of one process on the CPU
    platform: names and global shapes with no weight memory."""
    platform = setup()
    with local_world(cfg.parallel, platform, cfg.trainer.seed) as ps, parameters_on_meta():
        model, _ = build_omni_model(cfg, ps, platform, platform_leaves(platform), init=False)
    return model
