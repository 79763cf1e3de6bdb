#!/usr/bin/env bash
# fp32 all_reduce: MPI's native Allreduce vs mpicomm's bytes algorithm (and auto), 1 KiB - 256 MiB,
# interleaved rounds; prints the table `auto` should use (mpicomm/reduction.py thresholds).
# Writes to ./mpicomm-crossover (not committed: benchmarks/results/ holds one result set).
# Usage: benchmarks/run_crossover.sh [NRANKS] [extra bench options...]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-2}"; shift || true
exec timeout 1800 mpiexec -n "$n" python -m mpicomm bench --crossover \
    --min-bytes 1K --max-bytes 256M --rounds 3 --targets benchmarks/targets.py \
    --out mpicomm-crossover "$@"
