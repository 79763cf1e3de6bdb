#!/bin/bash
# CI: the multi-node checks on simulated hosts (network namespaces). Needs root and `ip netns`;
# elsewhere it prints why and exits 0 without running them.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then echo "multinode: SKIPPED: needs root for network namespaces"; exit 0; fi
if ! ip netns list > /dev/null 2>&1; then echo "multinode: SKIPPED: 'ip netns' unavailable"; exit 0; fi
if ! command -v mpiexec > /dev/null; then echo "multinode: SKIPPED: mpiexec not on PATH"; exit 0; fi
exec timeout -k 10 900 bash tests/system/multinode/run.sh "$@"
