"""Data: where micro-batches come from. Synthetic token sequences now; energon-backed omni data
(and sequence packing) plug in behind the same ``MicroBatches`` interface."""

from omni_train.data.batches import MicroBatches, build_data
from omni_train.data.synthetic import SyntheticTokens

__all__ = ["MicroBatches", "SyntheticTokens", "build_data"]
