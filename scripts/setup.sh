#!/usr/bin/env bash
# Create .venv with everything mpicomm needs: the CPU torch wheel first (any other torch
# requirement would download several GB of CUDA packages), then mpicomm with the MPICH wheel.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [extra,extra,...]
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-test,docs,mpich}
python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
python -c "import mpicomm, mpi4py, torch; print('mpicomm', mpicomm.__version__, '| torch', torch.__version__, '| mpi4py', mpi4py.__version__)"
