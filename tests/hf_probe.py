"""omni-train's logits for the parity samples, from an imported checkpoint, on any layout (run by
tests/test_hf_checkpoint.py under torchrun). Rank 0 saves the list of ``[L, V]`` logits to OUT.
With ``peft`` overrides the model is built with those adapters and a LoRA checkpoint's adapters
are loaded into them (live, not merged).

Usage: torchrun --nproc-per-node N tests/hf_probe.py CKPT PARITY.jsonl MEDIA OUT [overrides]
"""

from __future__ import annotations

import sys

import torch

from omni_train.checkpoint.io import load_weights
from omni_train.config import compose_job
from omni_train.hf.compare import our_logits, samples_from_jsonl
from omni_train.hf.convert import model_from_section, resolve_checkpoint
from omni_train.model.assembly import build_model
from omni_train.parallel.state import destroy_parallel, init_parallel
from omni_train.platform import setup


def main(ckpt: str, jsonl: str, media: str, out: str, *overrides: str) -> None:
    path, section, _ = resolve_checkpoint(ckpt)
    cfg = compose_job([*overrides, "trainer.precision=fp32"])
    cfg.model = model_from_section(section)
    platform = setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    try:
        model = build_model(cfg, ps, platform).module
        load_weights(path, model, merge=not cfg.peft.enabled)
        model.eval()
        pad = cfg.parallel.tp if cfg.parallel.sp else 1
        logits = [our_logits(model, s, pad) for s in samples_from_jsonl(jsonl, media, cfg)]
        if ps.is_main:
            torch.save(logits, out)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:])
