"""``omni-train model summary``: parameters per component, built on the meta device.

The model is built in one process on the CPU platform (parameter names and shapes are the same on
both platforms), with every parameter moved to the meta device the moment a module registers it
and weight initialisation skipped, so a 33B-parameter model is summarised without allocating its
weights. Counts are global (tensor parallel 1), each shared tensor once.

Active parameters per token: everything an LM token passes through — all LM parameters except
the input-embedding table (a lookup, not compute) and the routed experts it is not sent to
(``top_k / num_experts`` of them are used). Encoders and projectors run per media item, not per
token, and are listed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from omni_train.config import compose_job
from omni_train.log import install_filters
from omni_train.model.meta import build_on_meta

_ROUTED_EXPERT = ".mlp.experts."  # megatron: routed experts; shared experts are .shared_experts.
_INPUT_EMBEDDING = "llm.embedding.word_embeddings.weight"


def summarize(overrides: list[str]) -> dict:
    """Build ``model=...`` on meta and count. Runs in a fresh single-process world."""
    os.environ.setdefault("OMNI_TRAIN_PLATFORM", "cpu")
    cfg = compose_job([*overrides, "parallel=single", "trainer.precision=fp32"])
    start = time.process_time()
    model = build_on_meta(cfg)
    build_cpu_s = time.process_time() - start
    per_component: dict[str, int] = {name: 0 for name in model.components()}
    active = 0
    m = cfg.model
    for name, param in model.named_parameters():  # named_parameters() yields shared ones once
        if param.device.type != "meta":
            raise RuntimeError(f"{name} was allocated ({param.device}); the summary must not")
        n = param.numel()
        component = name.split(".", 1)[0]
        per_component[component] += n
        if component != "llm" or name == _INPUT_EMBEDDING:
            continue
        if _ROUTED_EXPERT in name:
            active += n * m.moe_router_topk / m.num_moe_experts
        else:
            active += n
    return {
        "model": m.name,
        "components": per_component,
        "total": sum(per_component.values()),
        "active_per_token": round(active),
        "layers": {symbol: m.hybrid_pattern.count(symbol) for symbol in "M*-E"},
        # evidence that no weights were allocated (Linux reports ru_maxrss in KiB)
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # CPU seconds of the build (libraries it imports included), not wall time: a test
        # compares it across models without being moved by other processes on the machine
        "build_cpu_s": round(build_cpu_s, 2),
    }


def format_table(summary: dict) -> str:
    rows = [(name, n) for name, n in summary["components"].items()]
    rows += [("total", summary["total"]), ("active per LM token", summary["active_per_token"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"model {summary['model']}  layers {summary['layers']}"]
    lines += [f"{name:<{width}}  {n:>16,}  {n / 1e9:8.3f} B" for name, n in rows]
    lines.append(f"(built on the meta device; peak RSS {summary['peak_rss_mib']} MiB)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    install_filters()  # an entry point: see omni_train.log.QUIET
    parser = argparse.ArgumentParser(prog="omni-train model summary")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, overrides = parser.parse_known_args(argv)
    summary = summarize(overrides)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
