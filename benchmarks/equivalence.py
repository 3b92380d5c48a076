"""How far each parallel layout is from the single-process run (CPU, gloo, 2 processes).

    .venv/bin/python benchmarks/equivalence.py [--steps 3] [--out DIR]

Runs the tiny LM for a few fp32 steps in each layout, with the same data, and prints the largest
relative difference from the world-of-one baseline of the same run, in per-step loss and global
grad norm. It also prints the wall time relative to the baseline. EP layouts start from the
baseline's first checkpoint on both sides (expert init draws depend on the EP layout).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from omni_train.stage.launch import launch_stage


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="omni-equivalence-"))
    common = [
        "stage=smoke",
        "model=tiny",
        "trainer.precision=fp32",
        f"trainer.train_steps={args.steps}",
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=4",
        "trainer.save_interval=0",
        "trainer.eval_iters=1",
    ]

    def run(name, nproc, *extra):
        start = time.perf_counter()
        manifest = launch_stage(nproc, out / name, *common, *extra)
        return manifest, time.perf_counter() - start

    base, base_t = run("base", 1, "parallel=single")
    init = f"checkpoint.init_from={out / 'base'}"
    base_init, base_init_t = run("base_init", 1, "parallel=single", init)
    layouts = [
        ("TP2 + SP", run("tp2", 2, "parallel=tp2"), (base, base_t)),
        (
            "DP2 (distributed optimizer)",
            run("dp2", 2, "parallel=single"),
            (base, base_t),
        ),
        (
            "DP2 (plain optimizer)",
            run("dp2p", 2, "parallel.distributed_optimizer=false"),
            (base, base_t),
        ),
        ("EP2 alltoall", run("ep2", 2, "parallel=ep2", init), (base_init, base_init_t)),
        (
            "EP2 allgather",
            run("ep2ag", 2, "parallel=ep2", "parallel.moe_token_dispatcher=allgather", init),
            (base_init, base_init_t),
        ),
    ]
    print(f"\n{args.steps} steps, tiny LM, fp32, CPU/gloo; baseline: 1 process, same data\n")
    print("| layout | max rel loss diff | max rel grad-norm diff | wall time vs baseline |")
    print("|---|---|---|---|")
    for name, (m, t), (ref, ref_t) in layouts:
        print(
            f"| {name} | {_max_rel(m['losses'], ref['losses']):.1e} "
            f"| {_max_rel(m['grad_norms'], ref['grad_norms']):.1e} | {t / ref_t:.2f}x |"
        )


if __name__ == "__main__":
    main()
