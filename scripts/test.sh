#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv, lint, run the multi-rank tests (tests/mpi)
# under mpiexec at 1, 2, 3 and 4 ranks (each bounded by timeouts), the CUDA test file in its CPU
# self-test mode, then the single-process tests (tests/unit; tests/jobs, which start their own
# mpiexec jobs; tests/system skip without a system).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,docs,mpich,examples,bench
# shellcheck disable=SC1091
. .venv/bin/activate
export PYTHONUNBUFFERED=1
echo "== lint"
ruff check . && ruff format --check .
for n in 1 2 3 4; do
    echo "== multi-rank tests on $n rank(s)"
    # pytest-timeout ends a stuck rank (its exit ends the job); the outer timeout bounds the rest.
    timeout -k 10 900 mpiexec -n "$n" python -m pytest --with-mpi -q -p no:cacheprovider \
        --timeout=300 --timeout-method=thread tests/mpi
done
echo "== CUDA test file in CPU self-test mode (its device-independent part, staging path), 3 ranks"
MPICOMM_TEST_CUDA_ON_CPU=1 timeout -k 10 300 mpiexec -n 3 python -m pytest --with-mpi -q \
    -p no:cacheprovider --timeout=120 --timeout-method=thread tests/mpi/test_cuda.py
echo "== single-process tests"
timeout -k 10 1800 python -m pytest -q -p no:cacheprovider --timeout=600 --ignore=tests/mpi tests
