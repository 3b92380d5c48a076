#!/usr/bin/env bash
# The prepared device check for one lent GPU: kernels CPU vs device, a FlexAttention vs
# dense-mask probe, the tiny omni smoke at world size 1 in bf16 (benchmarks/gpu/check.py says
# what each measures). It needs only the machine's own PyTorch + Triton and the pure-Python
# wheels benchmarks/gpu/wheels.sh puts in .whl/ beforehand, on a machine with a registry.
#
# On the device machine, from the repository root (the device tool: carry [".whl"]):
#   bash benchmarks/gpu/check.sh "$OUT"
# It stops itself after 7 min 50 s; check.md and check.json land in the given folder.
# Plumbing test without a GPU, in the CPU venv (the .whl/ wheels are cp312, for the device):
#   CHECK_WHEELS=0 PYTHON=.venv/bin/python bash benchmarks/gpu/check.sh /tmp/check --device cpu
set -euo pipefail
out="${1:-${OUT:-runs/gpu_check}}"
shift || true
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
if [ "${CHECK_WHEELS:-1}" = 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p "$out"
timeout 470 "$PYTHON" benchmarks/gpu/check.py --out "$out" "$@" 2>&1 | tee "$out/check.log"
