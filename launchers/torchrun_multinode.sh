#!/usr/bin/env bash
# Start omni-train on this node of a multi-node job: one torchrun per node, one process per GPU,
# through `omni-train run` (python -m omni_train.cli run), which checks the job before it starts
# any process, stops the ranks with a checkpoint on SIGTERM/SIGINT/SIGUSR1 (exit code 75: run
# the same command again to resume) and takes its torchrun and ranks down with it if it dies.
# Needs NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; GPUS_PER_NODE defaults to 8.
# Arguments are Hydra overrides, e.g.: launchers/torchrun_multinode.sh stage=smoke parallel=tp2
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
: "${MASTER_PORT:=29500}"
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m omni_train.cli run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
