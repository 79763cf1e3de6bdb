#!/bin/bash
# A two-node Slurm on the simulated hosts (cluster.sh must be up): slurmctld on the first host,
# one slurmd per host, one munged for the cluster, all state under $MCMN_STATE/slurm.
#
#   slurm.sh up                 start the daemons, wait until every node is idle
#   slurm.sh job [CMD...]       sbatch -N 2 (MCMN_PER_HOST tasks per node, default 2) the job
#                               script with CMD (default: python -m mpicomm check), wait, print
#                               its output, exit 0 only if it completed with exit code 0
#   slurm.sh down               stop the daemons (SIGKILL, by PID) and remove the state
#
# The job script is $MCMN_JOB_SCRIPT if set, else slurm/run.sbatch when the tree has it, else
# tests/system/multinode/run.sbatch. MCMN_JOB_TIMEOUT: seconds the job may take (default 300).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
STATE=${MCMN_STATE:-/run/mpicomm-multinode}
S=$STATE/slurm
HOSTS=(mcnode1 mcnode2)
CPUS_PER_NODE=2
JOB_TIMEOUT=${MCMN_JOB_TIMEOUT:-300}
export SLURM_CONF=$S/slurm.conf

log() { printf '[slurm.sh] %s\n' "$*"; }
on() { local h=$1; shift; "$HERE/hostexec" "$h" "$@"; }

pidof_file() { [ -s "$1" ] && cat "$1"; }

alive() {  # a PID that runs and is not a zombie
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2> /dev/null) || return 1
    [ "$st" != Z ]
}

pids() {  # every daemon this script started
    local f
    for f in "$S"/munged.pid "$S"/slurmctld.pid "$S"/*/slurmd.pid; do
        [ -s "$f" ] && cat "$f"
    done
}

down() {
    local p
    for p in $(pids); do kill -9 "$p" 2> /dev/null || true; done
    # slurmstepd and job processes of an unfinished job live in the hosts' namespaces
    for h in "${HOSTS[@]}"; do
        for p in $(ip netns pids "$h" 2> /dev/null); do kill -9 "$p" 2> /dev/null || true; done
    done
    rm -rf "$S"
}

write_conf() {
    local i
    cat > "$SLURM_CONF" <<CONF
ClusterName=mcmn
SlurmctldHost=${HOSTS[0]}(10.213.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge/munge.socket
StateSaveLocation=$S/ctld
SlurmctldPidFile=$S/slurmctld.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdSpoolDir=$S/%n
SlurmdPidFile=$S/%n/slurmd.pid
SlurmdLogFile=$S/%n/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SwitchType=switch/none
MpiDefault=pmi2
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
CONF
    for i in "${!HOSTS[@]}"; do
        echo "NodeName=${HOSTS[$i]} NodeAddr=10.213.0.$(( i + 1 )) CPUs=$CPUS_PER_NODE State=UNKNOWN" >> "$SLURM_CONF"
    done
    echo "PartitionName=mc Nodes=ALL Default=YES MaxTime=30 State=UP OverSubscribe=NO" >> "$SLURM_CONF"
}

up() {
    local h i
    [ -d "$STATE" ] || { log "the cluster is not up (cluster.sh up)"; return 1; }
    command -v slurmd > /dev/null && command -v munged > /dev/null \
        || { log "slurmd/munged not installed"; return 1; }
    down
    mkdir -p "$S/ctld" "$S/munge"
    for h in "${HOSTS[@]}"; do mkdir -p "$S/$h"; done
    write_conf
    # munge: its own key and socket; it insists on munge-owned, private paths
    dd if=/dev/urandom of="$S/munge/munge.key" bs=1 count=1024 status=none
    chown -R munge:munge "$S/munge"; chmod 755 "$S/munge"; chmod 400 "$S/munge/munge.key"
    runuser -u munge -- munged --socket="$S/munge/munge.socket" --key-file="$S/munge/munge.key" \
        --pid-file="$S/munge/munged.pid" --log-file="$S/munge/munged.log" \
        --seed-file="$S/munge/munged.seed" || { log "munged failed"; return 1; }
    cp "$S/munge/munged.pid" "$S/munged.pid"
    on "${HOSTS[0]}" slurmctld -f "$SLURM_CONF" || { log "slurmctld failed"; cat "$S/slurmctld.log"; return 1; }
    for h in "${HOSTS[@]}"; do
        on "$h" slurmd -f "$SLURM_CONF" -N "$h" || { log "slurmd on $h failed"; cat "$S/$h/slurmd.log"; return 1; }
    done
    for i in $(seq 1 60); do
        local idle
        idle=$(on "${HOSTS[0]}" sinfo -h -N -o '%N %t' 2> /dev/null | awk '$2=="idle"' | wc -l)
        if [ "$idle" = "${#HOSTS[@]}" ]; then
            log "up: ${HOSTS[*]} idle (slurmctld on ${HOSTS[0]}, one slurmd per host)"
            return 0
        fi
        sleep 1
    done
    log "nodes did not become idle:"
    on "${HOSTS[0]}" sinfo -N 2>&1
    tail -20 "$S/slurmctld.log" "$S"/*/slurmd.log
    return 1
}

job() {
    local script=${MCMN_JOB_SCRIPT:-$ROOT/slurm/run.sbatch}
    [ -f "$script" ] || script=$HERE/run.sbatch
    [ $# -gt 0 ] || set -- python -m mpicomm check
    local per=${MCMN_PER_HOST:-2} out=$S/job-%j.out id state t0=$SECONDS
    local n=$(( ${#HOSTS[@]} * per )) minutes=$(( JOB_TIMEOUT / 60 + 5 ))
    log "sbatch -N ${#HOSTS[@]} -n $n ${script#"$ROOT"/} $*"
    id=$(cd "$ROOT" && on "${HOSTS[0]}" sbatch --parsable -N "${#HOSTS[@]}" -n "$n" \
        --ntasks-per-node="$per" -t "$minutes" -o "$out" -e "$out" "$script" "$@") \
        || { log "sbatch failed"; return 1; }
    id=${id%%;*}
    out=${out/\%j/$id}
    while (( SECONDS - t0 < JOB_TIMEOUT )); do
        state=$(on "${HOSTS[0]}" squeue -h -j "$id" -o %T 2> /dev/null)
        [ -z "$state" ] && break
        sleep 1
    done
    local info
    info=$(on "${HOSTS[0]}" scontrol show job "$id" 2> /dev/null)
    if [ -n "$(on "${HOSTS[0]}" squeue -h -j "$id" 2> /dev/null)" ]; then
        log "job $id did not finish within ${JOB_TIMEOUT}s; cancelling"
        on "${HOSTS[0]}" scancel -s KILL "$id"
        cat "$out" 2> /dev/null
        return 1
    fi
    cat "$out" 2> /dev/null
    local st ec nodes
    st=$(grep -o 'JobState=[A-Z_]*' <<< "$info" | cut -d= -f2)
    ec=$(grep -o ' ExitCode=[0-9:]*' <<< "$info" | cut -d= -f2)
    nodes=$(grep -o ' NodeList=[^ ]*' <<< "$info" | head -1 | cut -d= -f2)
    log "job $id: state ${st:-?}, exit code ${ec:-?}, nodes ${nodes:-?}, $(( SECONDS - t0 ))s"
    [ "$st" = COMPLETED ] && [ "$ec" = 0:0 ]
}

case "${1:-}" in
    up) up ;;
    job) shift; job "$@" ;;
    down) down ;;
    *) echo "usage: slurm.sh up | job [CMD...] | down" >&2; exit 2 ;;
esac
