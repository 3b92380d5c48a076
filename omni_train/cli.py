"""``omni-train``: the command-line front door.

omni-train run [--nproc-per-node N] stage=smoke model=tiny [overrides]
    launches ``torchrun -m omni_train.train`` with the same overrides (same code path);
omni-train config [overrides]
    prints the composed, validated config as YAML.
omni-train model summary model=NAME [--json]
    parameters per component, total and active per token (meta device, no weight memory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from omegaconf import OmegaConf


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from omni_train.config import compose_job, validate

    # Fail on a bad config here, in one process, before torchrun starts N of them.
    validate(compose_job(overrides), args.nproc_per_node * args.nnodes)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={args.nproc_per_node}",
        f"--nnodes={args.nnodes}",
    ]
    cmd += ["--standalone"] if args.nnodes == 1 else [f"--rdzv-endpoint={args.rdzv_endpoint}"]
    cmd += ["-m", "omni_train.train", *overrides]
    return subprocess.call(cmd, env=env)


def _config(args: argparse.Namespace, overrides: list[str]) -> int:
    from omni_train.config import compose_job, to_dict, validate

    cfg = compose_job(overrides)
    if args.world_size:
        validate(cfg, args.world_size)
    print(OmegaConf.to_yaml(to_dict(cfg)), end="")
    return 0


def _model(args: argparse.Namespace, overrides: list[str]) -> int:
    from omni_train.config import compose_job

    compose_job(overrides)  # a bad config fails here with one line
    # The summary builds on the CPU platform in a fresh process (shapes are identical on both
    # platforms); hiding CUDA keeps a GPU host from selecting the GPU path.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMNI_TRAIN_PLATFORM="cpu")
    cmd = [sys.executable, "-m", "omni_train.model.summary", *overrides]
    return subprocess.call(cmd + (["--json"] if args.json else []), env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="omni-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one stage (launches torchrun)")
    run.add_argument("--nproc-per-node", type=int, default=1)
    run.add_argument("--nnodes", type=int, default=1)
    run.add_argument("--rdzv-endpoint", default="", help="host:port of node 0 when nnodes > 1")
    run.set_defaults(func=_run)
    show = sub.add_parser("config", help="print the composed config")
    show.add_argument("--world-size", type=int, default=0, help="also validate for this size")
    show.set_defaults(func=_config)
    model = sub.add_parser("model", help="inspect a model config")
    model.add_argument("action", choices=["summary"])
    model.add_argument("--json", action="store_true", help="machine-readable output")
    model.set_defaults(func=_model)
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        parser.error(f"unknown option(s) {bad}; overrides look like key=value")
    if args.command == "run" and args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address)")
    try:
        return args.func(args, overrides)
    except ValueError as e:
        print(f"omni-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
