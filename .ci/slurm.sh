#!/usr/bin/env bash
# CI step: real Slurm on this machine. Installs Slurm from Debian's packages (apt-get), starts a
# one-node cluster, runs tests/test_slurm.py against it (failing, not skipping, if the cluster is
# missing), and stops the daemons it started, whatever happened. Every step has a timeout.
#
#   bash .ci/slurm.sh          (as root, from anywhere; uses the python on PATH: the CI venv)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cleanup() {
    local rc=$?
    timeout 90 bash tests/slurm/cluster.sh down || echo "slurm.sh: teardown failed" >&2
    exit "$rc"
}

if ! command -v slurmctld >/dev/null || ! command -v shellcheck >/dev/null; then
    timeout 900 bash tests/slurm/cluster.sh install
fi
trap cleanup EXIT
timeout 120 bash tests/slurm/cluster.sh up
echo "slurm.sh: python on PATH: $(command -v python)"
MPICOMM_REQUIRE_SLURM=1 timeout 480 python -m pytest -q -p no:cacheprovider --durations=5 tests/test_slurm.py
