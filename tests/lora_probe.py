"""LoRA adapters on the tiny omni model, one process (run under torchrun by tests/test_lora.py).

On a fixed mixed batch (text, images, video, audio; omni_probe.mixed_batch), in eval mode:
- ``zero_b_equal``: with B = 0 the logits equal the base model's, bit for bit;
- ``merged_max_rel_diff``: with random B, the logits against the base weights merged
  (W + alpha / r * B A, the adapters off);
- ``trainable``: the parameters that require a gradient (only adapters, every component adapted);
- ``errors``: what apply_lora says to a pattern matching nothing, a router, a frozen tower.
Rank 0 writes ``lora.json`` into OUT.

Usage: torchrun --nproc-per-node 1 tests/lora_probe.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omni_probe import mixed_batch, tiny_omni  # tests/ is this script's folder

from omni_train.config.peft import LORA_GROUPS, PeftConfig
from omni_train.model.lora import _FORWARDS, apply_lora
from omni_train.parallel.state import destroy_parallel

ALL = list(LORA_GROUPS)


def logits(model, cfg) -> torch.Tensor:
    ids, _, media = mixed_batch(cfg)
    with torch.no_grad():
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        return model(input_ids=ids, position_ids=pos, attention_mask=None, media=media).float()


def adapted(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora")}


def main() -> None:
    out = Path(sys.argv[1])
    peft = [f"peft.targets=[{','.join(ALL)}]", "peft.method=lora", "peft.rank=4"]
    cfg, ps, model = tiny_omni(peft)
    model.eval()
    result: dict = {"adapted": sorted({n.split(".", 1)[0] for n in adapted(model)})}
    result["num_adapted"] = len(adapted(model))
    result["trainable"] = sorted(
        {n.split(".", 1)[0] + (".lora" if ".lora." in n else ".base")
         for n, p in model.named_parameters() if p.requires_grad}
    )  # fmt: skip
    with_adapters = logits(model, cfg)
    modules = adapted(model)
    for m in modules.values():  # the class's own forward: the base alone
        del m.forward
    base = logits(model, cfg)
    result["zero_b_equal"] = bool(torch.equal(with_adapters, base))
    g = torch.Generator().manual_seed(0)
    for m in modules.values():  # adapters back on (apply_lora's forwards), B random
        with torch.no_grad():
            m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=g) * 0.05)
        m.forward = _FORWARDS[m.lora.kind].__get__(m)
    live = logits(model, cfg)
    result["adapters_change_logits"] = not torch.equal(live, base)
    for m in modules.values():
        with torch.no_grad():
            m.weight += m.lora.scale * (m.lora.B @ m.lora.A)
        del m.forward
    merged = logits(model, cfg)
    result["merged_max_rel_diff"] = float((live - merged).abs().max() / merged.abs().max())

    errors = {}
    for label, overrides, trainable in (
        ("nothing", PeftConfig("lora", 4, 8.0, 0.0, [], [r"llm\.no_such_layer"]), ["llm"]),
        ("router", PeftConfig("lora", 4, 8.0, 0.0, [], [r"llm\.decoder\.layers\.\d+\.mlp\.router"]),
         ["llm"]),
        ("frozen", PeftConfig("lora", 4, 8.0, 0.0, ["vision_blocks"], []), ["llm"]),
    ):  # fmt: skip
        try:
            apply_lora(model, overrides, trainable, 0)
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    result["errors"] = errors
    if ps.is_main:
        (out / "lora.json").write_text(json.dumps(result, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
