"""omni-train: multi-stage omni-modal SFT on Megatron-Core.

Data flow, one package per step: config -> stage -> model -> data -> training -> checkpoint.
"""

__version__ = "0.1.0"
