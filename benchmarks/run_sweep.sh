#!/usr/bin/env bash
# The full sweep as measured for docs/benchmarks.md: every collective, fp32 and bf16, 8 B - 256 MiB,
# mpicomm vs raw mpi4py vs torch.distributed gloo, backends interleaved over 2 rounds.
# Usage: benchmarks/run_sweep.sh [NRANKS] [extra bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2}"; shift || true
exec timeout 3000 mpiexec -n "$n" python -m mpicomm bench \
    --min-bytes 8 --max-bytes 256M --dtypes float32,bfloat16 --rounds 2 \
    --out benchmarks/results "$@"
