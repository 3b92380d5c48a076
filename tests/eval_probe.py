"""For tests/test_eval.py: writes the tiny omni model's freshly initialised weights as a
torch_dist checkpoint OUT (no manifest: the fingerprint check passes, as for an imported one),
then answers every row of JSONL (media beside it) greedily with NEW tokens and writes
SELF_JSONL: each readable row with its last assistant turn replaced by the model's own answer
(a reference the model must match, teacher-forced and generated alike).

Usage: torchrun --nproc-per-node 1 tests/eval_probe.py OUT JSONL SELF_JSONL NEW [overrides]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron.core import dist_checkpointing

from omni_train.inference.generate import answer_rows, generation_config, read_rows
from omni_train.inference.sampling import SamplingConfig
from omni_train.model.assembly import build_model
from omni_train.parallel.state import destroy_parallel, init_parallel
from omni_train.platform import setup


def main() -> None:
    out, jsonl, self_jsonl, new, *overrides = sys.argv[1:]
    cfg = generation_config(overrides)
    platform = setup()
    ps = init_parallel(cfg.parallel, platform, cfg.trainer.seed)
    model = build_model(cfg, ps, platform).module
    dist_checkpointing.save({"model": model.sharded_state_dict()}, out)
    model.eval()
    rows = read_rows(jsonl, Path(jsonl).parent)
    greedy = SamplingConfig(max_new_tokens=int(new))
    answers = answer_rows(model, cfg, rows, greedy, 8, platform.device)
    lines = []
    for line, a in zip(Path(jsonl).read_text().splitlines(), answers, strict=True):
        row = json.loads(line)
        if "error" in a or "conversation" not in row:
            continue
        row["conversation"][-1] = {"role": "assistant", "content": a["text"]}
        row["category"] = "self"
        lines.append(json.dumps(row) + "\n")
    Path(self_jsonl).write_text("".join(lines))
    destroy_parallel()


if __name__ == "__main__":
    main()
