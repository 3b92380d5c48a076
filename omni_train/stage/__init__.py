"""The stage runner: one stage of the curriculum, from config to checkpoint and manifest."""

from omni_train.stage.runner import run_stage

__all__ = ["run_stage"]
