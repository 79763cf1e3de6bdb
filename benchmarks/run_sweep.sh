#!/usr/bin/env bash
# The committed result set (benchmarks/results/, docs/benchmarks.md "Quiet-machine run"): every
# collective, fp32 and bf16, at the sizes the targets name, mpicomm vs raw mpi4py vs gloo,
# backends interleaved over 3 rounds, targets from benchmarks/targets.py. Plots on demand:
# python -m mpicomm.bench.plots benchmarks/results/results.json OUT (they are not committed).
# Usage: benchmarks/run_sweep.sh [NRANKS] [extra bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2}"; shift || true
exec timeout 3000 mpiexec -n "$n" python -m mpicomm bench \
    --sizes 8,1K,4K,1M,4M,16M,64M --iters 50 --min-iters 5 --iter-bytes 256M --rounds 3 \
    --targets benchmarks/targets.py --no-plots --out benchmarks/results "$@"
