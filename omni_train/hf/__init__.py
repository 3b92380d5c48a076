"""Hugging Face interop, above the runtime: released checkpoints in (``import-hf``: the omni
model, its LM, RADIO, Parakeet, ``.nemo`` archives), served ones out (``export-hf``: config.json +
safetensors that transformers and vLLM load), and ``compare-hf`` against the reference model.
The config.json field map it shares with ``model=hf`` lives in :mod:`omni_train.config.hf`."""
