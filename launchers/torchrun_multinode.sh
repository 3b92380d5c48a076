#!/usr/bin/env bash
# Start omni-train on this node of a multi-node job: one torchrun per node, one process per GPU,
# through `omni-train run` (python -m omni_train.cli run), which checks the job before it starts
# any process, stops the ranks with a checkpoint on SIGTERM/SIGINT/SIGUSR1 (exit code 75: run
# the same command again to resume) and takes its torchrun and ranks down with it if it dies.
#
# Two ways for the nodes to find each other:
#   c10d (the same command on every node; what launchers/slurm.sbatch uses):
#     NNODES=4 RDZV_ENDPOINT=node0:29400 launchers/torchrun_multinode.sh stage=smoke ...
#     RDZV_ID names the job, the same on every node (default $SLURM_JOB_ID, else omni-train).
#   static (each node told its rank):
#     NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 [MASTER_PORT=29500] launchers/torchrun_multinode.sh ...
# GPUS_PER_NODE defaults to 8. Arguments are Hydra overrides.
set -euo pipefail
: "${NNODES:?set NNODES}"

# Communication defaults a Megatron job expects; each `${VAR:-...}`, so a value already in the
# environment (exported before sbatch, which passes it on) wins. Network choices that depend on
# the cluster (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_TIMEOUT, ...) are not
# guessed here: set them in the environment the same way (docs/gpu.md).
# Megatron's tensor/sequence-parallel layers issue a collective, then the GEMM it overlaps with;
# one hardware queue keeps that order, or the overlap is lost.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# Async collectives (the overlapped gradient reduce and parameter gather) stash their tensors
# instead of recordStream, whose deferred frees make the caching allocator hold extra memory.
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
# NCCL is silent by default; WARN puts its own reason for a failed init or collective (a wrong
# interface, an IB timeout) into the job log.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

cd "$(dirname "$0")/.."
rendezvous=()
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  rendezvous=(--rdzv-endpoint "$RDZV_ENDPOINT")
  [ -n "${RDZV_ID:-}" ] && rendezvous+=(--rdzv-id "$RDZV_ID")
elif [ -n "${NODE_RANK:-}" ]; then
  : "${MASTER_ADDR:?with NODE_RANK, set MASTER_ADDR to the address of node 0}"
  rendezvous=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
              --master-port "${MASTER_PORT:-29500}")
elif [ "$NNODES" -gt 1 ]; then
  echo "torchrun_multinode.sh: set RDZV_ENDPOINT=host:port (c10d) or NODE_RANK and MASTER_ADDR" >&2
  exit 2
fi
# launchers/slurm.sbatch signals this process (exec keeps the pid) by the pid left here.
if [ -n "${OMNI_TRAIN_PIDFILE:-}" ]; then echo "$$" >"$OMNI_TRAIN_PIDFILE"; fi
exec "${PYTHON:-python}" -m omni_train.cli run \
  --nnodes "$NNODES" --nproc-per-node "${GPUS_PER_NODE:-8}" "${rendezvous[@]}" "$@"
