#!/usr/bin/env bash
# CI step: real Slurm on this machine. Installs Slurm from Debian's packages (apt-get), starts a
# one-node cluster, runs tests/system/test_slurm.py against it (failing, not skipping, if the
# cluster is missing), and stops the daemons it started, whatever happened. Every step has a timeout.
#
#   bash .ci/slurm.sh   (as root, from anywhere; after scripts/setup.sh has made .venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cleanup() {
    local rc=$?
    timeout 90 bash tests/system/slurm/cluster.sh down || echo "slurm.sh: teardown failed" >&2
    exit "$rc"
}

if ! command -v slurmctld >/dev/null || ! command -v shellcheck >/dev/null; then
    timeout 900 bash tests/system/slurm/cluster.sh install
fi
trap cleanup EXIT
# The job's python is the one on PATH: the project's .venv (made by scripts/setup.sh) unless a
# venv is already active. slurmd runs the jobs on this machine, so they reach it too.
if [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
timeout 120 bash tests/system/slurm/cluster.sh up
echo "slurm.sh: python on PATH: $(command -v python || echo none)"
timeout 120 python -c "import mpi4py, torch" || {
    echo "slurm.sh: the python on PATH lacks mpi4py/torch: run scripts/setup.sh first" >&2
    exit 1
}
MPICOMM_REQUIRE_SLURM=1 timeout 480 python -m pytest -q -p no:cacheprovider --durations=5 tests/system/test_slurm.py
