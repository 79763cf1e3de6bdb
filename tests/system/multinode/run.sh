#!/bin/bash
# Multi-node checks on simulated hosts: brings up a 2-host cluster (cluster.sh), runs every check
# with 2 ranks per host over MPICH's hydra and the ssh stand-in, tears everything down (also on
# failure or interrupt), prints `network bytes: <N>` (bytes sent on the hosts' interfaces, proving
# the traffic crossed the virtual network) and exits 0 only if every check passed.
#
#   bash tests/system/multinode/run.sh [CHECK...]     default: all checks, in order
#   checks: topology info check tp hierarchical slurm
#
# Needs root, `ip netns`, and the project's venv active (mpiexec and python on PATH).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
HOSTS=(mcnode1 mcnode2)
PER_HOST=2
NP=$(( ${#HOSTS[@]} * PER_HOST ))
LAUNCH_TIMEOUT=${MCMN_LAUNCH_TIMEOUT:-240}
# Bytes a passing check must have put on the network (less: traffic did not cross the hosts)
declare -A MIN_BYTES=([check]=$(( 64 << 10 )) [hierarchical]=$(( 4 << 20 )))
export MCMN_STATE=${MCMN_STATE:-/run/mpicomm-multinode}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

log() { printf '[run.sh] %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "run.sh: needs root (network namespaces)"; exit 2; }
ip netns list > /dev/null 2>&1 || { echo "run.sh: 'ip netns' is not available"; exit 2; }
command -v mpiexec > /dev/null || { echo "run.sh: mpiexec not on PATH (activate the venv)"; exit 2; }
PY=$(command -v python) || { echo "run.sh: python not on PATH"; exit 2; }
MPIEXEC=$(command -v mpiexec)

# One cluster at a time on this machine.
exec 9> /run/lock/mpicomm-multinode.lock
flock -w 600 9 || { echo "run.sh: another run holds /run/lock/mpicomm-multinode.lock"; exit 2; }

# Processes that live in the hosts on purpose (Slurm daemons); everything else is reaped.
KEEP_PIDS=()

reap() {  # SIGKILL whatever a launch left in the hosts (hydra proxies ignore SIGTERM)
    local h pid keep
    for h in "${HOSTS[@]}"; do
        for pid in $(ip netns pids "$h" 2>/dev/null); do
            keep=0
            for k in "${KEEP_PIDS[@]}"; do [ "$pid" = "$k" ] && keep=1; done
            [ $keep = 1 ] || kill -9 "$pid" 2>/dev/null || true
        done
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "${SLURM_UP:-}" ] && bash "$HERE/slurm.sh" down > /dev/null 2>&1
    KEEP_PIDS=()
    reap
    bash "$HERE/cluster.sh" down
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mpi LAUNCH_ARGS...: mpiexec from the first host, PER_HOST ranks on each host, bounded.
mpi() {
    local hostlist rc
    hostlist=$(printf '%s:'"$PER_HOST"',' "${HOSTS[@]}")
    timeout -k 5 "$LAUNCH_TIMEOUT" "$HERE/hostexec" "${HOSTS[0]}" \
        "$MPIEXEC" -hosts "${hostlist%,}" -n "$NP" -launcher ssh -launcher-exec "$HERE/ssh" "$@"
    rc=$?
    reap
    [ $rc = 124 ] && log "launch timed out after ${LAUNCH_TIMEOUT}s"
    return $rc
}

have_module() { "$PY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)" 2> /dev/null; }

# ---- checks: each returns 0 pass, 1 fail, 77 skip (and says why) -----------------------------
check_topology() {
    mpi "$PY" "$HERE/progs/topology_check.py" --expect-nodes "${#HOSTS[@]}" \
        --expect-per-node "$PER_HOST"
}

check_info() {
    have_module mpicomm.cli || { log "SKIP: mpicomm.cli is not in this tree"; return 77; }
    local out
    out=$(mpi "$PY" -m mpicomm info 2>&1) || { echo "$out"; return 1; }
    echo "$out"
    for h in "${HOSTS[@]}"; do
        grep -q "$h" <<< "$out" || { log "info does not show host $h"; return 1; }
    done
}

check_check() {
    have_module mpicomm.cli || { log "SKIP: mpicomm.cli is not in this tree"; return 77; }
    mpi "$PY" -m mpicomm check || return 1
    have_module mpicomm.hierarchical || return 0
    log "again with MPICOMM_HIERARCHICAL=1 (every float all_reduce through the hierarchy)"
    mpi -genv MPICOMM_HIERARCHICAL 1 "$PY" -m mpicomm check
}

check_tp() {
    [ -f "$ROOT/examples/tp_inference.py" ] || { log "SKIP: examples/tp_inference.py is not in this tree"; return 77; }
    mpi "$PY" "$ROOT/examples/tp_inference.py"
}

check_hierarchical() {
    have_module mpicomm.hierarchical || { log "SKIP: mpicomm.hierarchical is not in this tree"; return 77; }
    mpi "$PY" "$HERE/progs/hierarchical_bench.py"
}

check_slurm() {
    [ -f "$HERE/slurm.sh" ] || { log "SKIP: slurm.sh is not in this tree"; return 77; }
    command -v slurmd > /dev/null || { log "SKIP: slurmd is not installed"; return 77; }
    SLURM_UP=1
    bash "$HERE/slurm.sh" up || return 1
    # one pair of ranks per node, then the conformance check, as Slurm jobs
    bash "$HERE/slurm.sh" job "$PY" "$HERE/progs/topology_check.py" --expect-nodes 2 \
        --expect-per-node 2 || return 1
    bash "$HERE/slurm.sh" job "$PY" -m mpicomm check
}

# ---- main ---------------------------------------------------------------------------------------
CHECKS=("$@")
[ ${#CHECKS[@]} -gt 0 ] || CHECKS=(topology info check tp hierarchical slurm)
# Optional checks may skip (their inputs come from other branches); the rest must pass.
OPTIONAL=" tp slurm "  # slurm skips where Slurm is not installed (scripts/test.sh runs before .ci/slurm.sh)

bash "$HERE/cluster.sh" up "${#HOSTS[@]}" > /dev/null || exit 1
log "hosts up: ${HOSTS[*]} ($PER_HOST ranks each, $NP ranks)"
start_bytes=$(bash "$HERE/cluster.sh" bytes)

declare -A RESULT
failed=0
for c in "${CHECKS[@]}"; do
    declare -F "check_$c" > /dev/null || { log "unknown check '$c'"; exit 2; }
    log "==== $c"
    b0=$(bash "$HERE/cluster.sh" bytes); t0=$SECONDS
    "check_$c"; rc=$?
    b1=$(bash "$HERE/cluster.sh" bytes)
    case $rc in
        0) RESULT[$c]=PASS
           if (( b1 - b0 < ${MIN_BYTES[$c]:-0} )); then
               RESULT[$c]="FAIL (only $(( b1 - b0 )) bytes on the network, expected >= ${MIN_BYTES[$c]})"
               failed=1
           fi ;;
        77) RESULT[$c]=SKIP; [[ $OPTIONAL == *" $c "* ]] || failed=1 ;;
        *) RESULT[$c]="FAIL (exit $rc)"; failed=1 ;;
    esac
    log "$c: ${RESULT[$c]} in $(( SECONDS - t0 ))s, $(( b1 - b0 )) bytes on the network"
done

total=$(( $(bash "$HERE/cluster.sh" bytes) - start_bytes ))
echo
for c in "${CHECKS[@]}"; do printf '  %-14s %s\n' "$c" "${RESULT[$c]}"; done
echo "network bytes: $total"
exit $failed
