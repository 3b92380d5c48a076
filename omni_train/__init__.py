"""omni-train: multi-stage omni-modal SFT on Megatron-Core.

The packages are layers, each importing only those below it (docs/architecture.md): log and
lifecycle, platform, config, parallel, data, model, checkpoint, training, then the stage runner,
the tools (datatools, plan, hf) and the entry points (train, cli).
"""

__version__ = "0.1.0"
