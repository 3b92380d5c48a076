"""Generation checks on the tiny omni model that need real processes (run under torchrun by
tests/test_generate.py), at any layout: greedy with the cache equals recomputing the whole
prefix each token for a batch of rows of different lengths and modalities (text; image;
video + audio; audio), a batch of one equals a batch of four, sampling is reproducible and
every rank picks the same tokens. Rank 0 writes ``result.json`` into OUT.

Usage: torchrun --nproc-per-node N tests/generate_probe.py OUT [overrides]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omni_probe import text, three_samples

from omni_train.data import tokens
from omni_train.data.media import Media
from omni_train.inference.generate import generate_batch, generate_no_cache, generation_config
from omni_train.inference.sampling import SamplingConfig, generator
from omni_train.model.assembly import build_model
from omni_train.parallel.state import destroy_parallel, init_parallel
from omni_train.platform import setup

NEW = 10  # tokens per row: a random model never stops, so every row runs them all


def rows(cfg) -> tuple[list[torch.Tensor], list[Media]]:
    """Text (23 tokens), an image (25), video + audio (35), audio (17 + a 1.5 s clip)."""
    samples = three_samples(cfg)
    g = torch.Generator().manual_seed(7)
    wav = torch.randn(24000, generator=g)
    audio = text(g, 5) + [cfg.model.media_tokens.audio] * tokens.audio_clip_tokens(
        wav.shape[0], cfg.model.audio
    )
    audio += text(g, 6)
    prompts = [s[0][0] for s in samples] + [torch.tensor(audio)]
    media = [s[2] for s in samples] + [Media(audio=[wav], audio_sample=[0])]
    return prompts, media


def main() -> None:
    out, *overrides = sys.argv[1:]
    cfg = generation_config(["model=tiny", "trainer.precision=fp32", *overrides])
    platform = setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    model = build_model(cfg, ps, platform).module.eval()
    prompts, media = rows(cfg)
    greedy = SamplingConfig(max_new_tokens=NEW)
    gen = generator(greedy)
    result: dict = {"layout": ps.describe(), "prompt_lengths": [int(p.shape[0]) for p in prompts]}
    result["cached"] = generate_batch(model, prompts, media, greedy, gen)
    result["recomputed"] = generate_no_cache(model, prompts, media, greedy, gen)
    result["one_by_one"] = [
        generate_batch(model, [p], [m], greedy, gen)[0] for p, m in zip(prompts, media, strict=True)
    ]
    sampled = SamplingConfig(max_new_tokens=NEW, temperature=1.5, top_k=50, top_p=0.9, seed=3)
    runs = [generate_batch(model, prompts, media, sampled, generator(sampled)) for _ in range(2)]
    result["sampled"] = runs
    other = SamplingConfig(max_new_tokens=NEW, temperature=1.5, top_k=50, top_p=0.9, seed=4)
    result["sampled_other_seed"] = generate_batch(model, prompts, media, other, generator(other))
    # every rank generated the same tokens (lockstep)
    mine = [result["cached"], runs[0]]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    result["ranks_agree"] = all(x == mine for x in everyone)
    # megatron-core internals the cache merge relies on (0.16.1)
    mixers = [m for m in model.llm.modules() if hasattr(m, "_get_states_from_cache")]
    result["mamba_mixers"] = len(mixers)
    result["cached_batch_size"] = sorted({m.cached_batch_size for m in mixers})
    if ps.is_main:
        (Path(out) / "result.json").write_text(json.dumps(result, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
