#!/usr/bin/env bash
# GPU verification of mpicomm: the CUDA tests at 2 and 4 ranks sharing one GPU, the staging tests,
# `python -m mpicomm info`/`check`, and the benchmark in its CUDA mode (JSON), each step under
# `timeout`.
#
# 1. Here (a machine with a package registry), from the repository root, once:
#        tests/gpu/run_on_gpu.sh fetch
#    downloads the MPICH, mpi4py and pytest-mpi wheels for the GPU machine's Python (3.12) into
#    .whl/ (git-ignored; about 15 MB).
# 2. On the GPU machine (the device tool's `run`, carry [".whl"], timeout_s 600), two calls:
#        bash tests/gpu/run_on_gpu.sh tests     # info, detection, CUDA tests n=2,4, staging, check
#        bash tests/gpu/run_on_gpu.sh bench     # mpicomm bench --device cuda, n=2 and n=4, 4 KiB .. 256 MiB
#    (`all` runs both, for machines without a per-command limit). Each phase stays under ~9.5
#    minutes. Results go to $OUT (or ./gpu_results, or the second argument): summary.txt,
#    logs-<phase>.tar.gz and bench_n{2,4}/results.json; the summary is also printed at the end.
#    MPI comes from the carried wheels, installed under /tmp/mpi (no registry needed).
#    QUICK=1 stops the benchmark at 4 MiB. The exit status is 0 only if every step passed.
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
MPI_PREFIX="${MPI_PREFIX:-/tmp/mpi}"
WHEELS=(mpich==5.0.2 mpi4py==4.1.2 pytest-mpi==0.6)

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

PHASE="${1:-all}"
case "$PHASE" in tests | bench | all) ;; *) echo "usage: $0 fetch|tests|bench|all [OUTDIR]"; exit 2 ;; esac
RESULTS="${2:-${OUT:-$ROOT/gpu_results}}"
LOGS="$(mktemp -d)"
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.txt"
status=0
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME SECONDS COMMAND...: run bounded, log to LOGS/NAME.log, record pass/fail
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    [[ $rc -eq 0 ]] || status=1
    note "$(printf '%-12s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$LOGS/$name.log")")"
}

# ---- MPI from the carried wheels (the GPU machine has no registry) --------------------------
if ls .whl/mpich-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --ignore-installed --no-index --no-deps --no-compile --no-cache-dir \
        --prefix "$MPI_PREFIX" .whl/*.whl || { echo "wheel install failed"; exit 2; }
    SITE="$(ls -d "$MPI_PREFIX"/lib/python3*/site-packages | head -n 1)"
    export PATH="$MPI_PREFIX/bin:$PATH"
    export LD_LIBRARY_PATH="$MPI_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export MPI4PY_LIBMPI="$MPI_PREFIX/lib/libmpi.so.12"  # mpi4py loads exactly this libmpi
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/mpich-*.whl: using the MPI already installed (run 'tests/gpu/run_on_gpu.sh fetch' here)"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
command -v mpiexec >/dev/null || { echo "no mpiexec on PATH"; exit 2; }
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MPICOMM_LOG_LEVEL="${MPICOMM_LOG_LEVEL:-WARNING}"

note "mpicomm GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
note "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
note "$("$PY" -c 'import sys, torch, mpi4py; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "mpi4py", mpi4py.__version__)' 2>&1)"

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs --timeout=120)
if [[ "$PHASE" != bench ]]; then
    step info_n1 30 "$PY" -m mpicomm info
    step info_n2 30 mpiexec -n 2 "$PY" -m mpicomm info
    cat "$LOGS/info_n2.log" >>"$SUMMARY"
    step detect 120 "${PYTEST[@]}" tests/unit/test_cuda_detect.py tests/jobs/test_cuda_detect.py
    step cuda_n2 150 mpiexec -n 2 "${PYTEST[@]}" --with-mpi tests/mpi/test_cuda.py
    step cuda_n4 150 mpiexec -n 4 "${PYTEST[@]}" --with-mpi tests/mpi/test_cuda.py
    step staging_n2 60 mpiexec -n 2 "${PYTEST[@]}" --with-mpi tests/mpi/test_staging.py
    step check_n2 40 mpiexec -n 2 "$PY" -m mpicomm check
    grep -h -E "^(FAILED|ERROR|SKIPPED)" "$LOGS"/*.log | sort | uniq -c | head -n 40 | tee -a "$SUMMARY"
fi
if [[ "$PHASE" != tests ]]; then
    BENCH_MAX="${BENCH_MAX:-256m}"
    [[ "${QUICK:-0}" == 1 ]] && BENCH_MAX=4m
    for n in 2 4; do
        # The engine's CUDA mode (tests/jobs/test_bench.py runs it on CPU with --cuda-dry-run):
        # mpicomm and gloo on the same CUDA tensors, d2h/h2d copy references, staging floors.
        step "bench_n$n" 270 mpiexec -n "$n" "$PY" -m mpicomm bench --device cuda \
            --collectives all_reduce,all_gather,reduce_scatter --backends mpicomm,gloo \
            --dtypes bf16,fp32 --min-bytes 4k --max-bytes "$BENCH_MAX" --step-factor 4 \
            --iter-bytes 512m --no-progress --no-plots --out "$RESULTS/bench_n$n"
        grep -E "^(#|  *[0-9.]+[KMG]?i?B )" "$LOGS/bench_n$n.log" >>"$SUMMARY"
    done
fi
tar -C "$LOGS" -czf "$RESULTS/logs-$PHASE.tar.gz" . && rm -rf "$LOGS"
note "$PHASE: $([[ $status -eq 0 ]] && echo PASS || echo FAIL)"
exit $status
