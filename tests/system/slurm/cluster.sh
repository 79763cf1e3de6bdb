#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for developers and CI.
#
#   sudo bash tests/system/slurm/cluster.sh install   # apt-get the Debian packages (munge, slurmctld, slurmd, ...)
#   sudo bash tests/system/slurm/cluster.sh up        # write slurm.conf, start munged, slurmctld, slurmd
#   bash tests/system/slurm/cluster.sh status         # daemons we started and sinfo
#   sudo bash tests/system/slurm/cluster.sh down      # cancel jobs, stop the daemons we started (by PID)
#
# The node advertises CPUS (default 4) CPUs whatever the machine has (config_overrides), so 4-task
# jobs fit on a 2-core machine. Only the daemons this script started are stopped: their PIDs are
# kept in $STATE/*.pid. A daemon that is already running (munged) is reused and left alone.
# Every wait is bounded. Settings (environment):
#   MPICOMM_SLURM_STATE  state/log directory        (default /tmp/mpicomm-slurm)
#   MPICOMM_SLURM_CPUS   CPUs advertised by the node (default 4)
#   MPICOMM_SLURM_CONF   slurm.conf to write         (default /etc/slurm/slurm.conf; refuses to
#                        overwrite a file that this script did not write)
set -euo pipefail

STATE=${MPICOMM_SLURM_STATE:-/tmp/mpicomm-slurm}
CPUS=${MPICOMM_SLURM_CPUS:-4}
CONF=${MPICOMM_SLURM_CONF:-/etc/slurm/slurm.conf}
MARKER="# written by mpicomm tests/system/slurm/cluster.sh"
PMIX_DIR=/usr/lib/x86_64-linux-gnu/pmix2/lib
NODE=$(hostname -s)

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# alive PID: true when the process exists and is not a zombie (PID 1 here does not reap orphans,
# so a stopped daemon lingers as a zombie: read the state field of /proc/PID/stat).
alive() {
    local pid=$1 stat state
    [[ -r /proc/$pid/stat ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    state=${stat##*) }
    state=${state%% *}
    [[ $state != Z && $state != X ]]
}

# wait_for SECONDS CMD...: run CMD every 0.2 s until it succeeds; false on timeout.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# stop NAME: SIGTERM the PID in $STATE/NAME.pid, wait up to 10 s, then SIGKILL.
stop() {
    local name=$1 pidfile="$STATE/$1.pid" pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if [[ -n $pid ]] && alive "$pid"; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_for 10 not_alive "$pid"; then
            log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_for 5 not_alive "$pid" || log "warning: $name (pid $pid) still alive"
        fi
    fi
    rm -f "$pidfile"
}
not_alive() { ! alive "$1"; }

cmd_install() {
    [[ $(id -u) == 0 ]] || die "install needs root"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends \
        munge slurmctld slurmd slurm-client libpmix2 shellcheck >/dev/null
    log "installed: $(slurmd -V)"
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; set MPICOMM_SLURM_CONF or remove it"
    fi
    mkdir -p "$(dirname "$CONF")"
    cat >"$CONF" <<EOF
$MARKER (state in $STATE)
ClusterName=mpicomm
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd.daemon.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # Open MPI under --mpi=pmix needs the native security module.
    local mpiconf
    mpiconf="$(dirname "$CONF")/mpi.conf"
    if [[ ! -f $mpiconf ]] || grep -qF "$MARKER" "$mpiconf"; then
        printf '%s\nPMIxEnv=PMIX_MCA_psec=native\n' "$MARKER" >"$mpiconf"
    fi
}

cmd_up() {
    [[ $(id -u) == 0 ]] || die "up needs root"
    command -v slurmctld >/dev/null || die "Slurm is not installed: run '$0 install' first"
    if [[ -f $STATE/slurmctld.pid ]] && alive "$(cat "$STATE/slurmctld.pid")"; then
        log "already up (state in $STATE)"
        return 0
    fi
    mkdir -p "$STATE/ctld" "$STATE/spool"
    write_conf

    # Slurm's pmix plugin dlopens the unversioned libpmix.so. Without it the first pmix step
    # hangs slurmd (which then ignores SIGTERM), so the link must exist before slurmd starts.
    if [[ -e $PMIX_DIR/libpmix.so.2 && ! -e $PMIX_DIR/libpmix.so ]]; then
        ln -s libpmix.so.2 "$PMIX_DIR/libpmix.so"
        log "linked $PMIX_DIR/libpmix.so -> libpmix.so.2"
    fi

    # munge: reuse a running munged, else start one as the munge user.
    if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
        log "munged already running: reusing it"
    else
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        chmod 0755 /run/munge
        if [[ ! -s /etc/munge/munge.key ]]; then
            timeout 30 mungekey --create --keyfile=/etc/munge/munge.key
            chown munge:munge /etc/munge/munge.key
            chmod 0400 /etc/munge/munge.key
        fi
        rm -f /run/munge/munged.pid
        timeout 10 runuser -u munge -- munged --pid-file=/run/munge/munged.pid
        wait_for 10 test -s /run/munge/munged.pid || die "munged did not start"
        cp /run/munge/munged.pid "$STATE/munged.pid"
        wait_for 10 bash -c 'munge -n </dev/null | unmunge' || die "munge does not work"
        log "started munged (pid $(cat "$STATE/munged.pid"))"
    fi

    rm -f "$STATE"/slurmctld.daemon.pid "$STATE"/slurmd.daemon.pid
    timeout 20 slurmctld -c -f "$CONF"
    wait_for 15 test -s "$STATE/slurmctld.daemon.pid" || die "slurmctld did not start: $(tail -5 "$STATE/slurmctld.log")"
    cp "$STATE/slurmctld.daemon.pid" "$STATE/slurmctld.pid"
    log "started slurmctld (pid $(cat "$STATE/slurmctld.pid"))"

    timeout 20 slurmd -c -f "$CONF"
    wait_for 15 test -s "$STATE/slurmd.daemon.pid" || die "slurmd did not start: $(tail -5 "$STATE/slurmd.log")"
    cp "$STATE/slurmd.daemon.pid" "$STATE/slurmd.pid"
    log "started slurmd (pid $(cat "$STATE/slurmd.pid"))"

    if ! wait_for 30 node_idle; then
        timeout 10 scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
        wait_for 15 node_idle || die "node $NODE not idle: $(timeout 5 sinfo -N 2>&1)"
    fi
    log "up: $(timeout 5 sinfo -h -N -o '%N %T cpus=%c' 2>&1)"
}
node_idle() {
    [[ $(SLURM_CONF=$CONF timeout 5 sinfo -h -N -n "$NODE" -o %T 2>/dev/null) == idle ]]
}

cmd_down() {
    export SLURM_CONF=$CONF
    if [[ -f $STATE/slurmctld.pid ]] && alive "$(cat "$STATE/slurmctld.pid")"; then
        timeout 10 scancel --full --quiet --partition=debug 2>/dev/null || true
        wait_for 20 no_jobs || log "warning: jobs still listed: $(timeout 5 squeue -h 2>&1)"
    fi
    stop slurmd
    stop slurmctld
    stop munged
    # Job steps whose slurmd is gone: list them (they belong to this cluster, the only one here).
    local pid left=()
    for pid in $(pgrep -x slurmstepd 2>/dev/null || true); do
        alive "$pid" && left+=("$pid")
    done
    if ((${#left[@]})); then
        log "killing leftover slurmstepd: ${left[*]}"
        kill -KILL "${left[@]}" 2>/dev/null || true
    fi
    if [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF"; then
        rm -f "$CONF"
        local mpiconf
        mpiconf="$(dirname "$CONF")/mpi.conf"
        if [[ -f $mpiconf ]] && grep -qF "$MARKER" "$mpiconf"; then rm -f "$mpiconf"; fi
    fi
    log "down (logs kept in $STATE)"
}
no_jobs() { [[ -z $(timeout 5 squeue -h -o %i 2>/dev/null) ]]; }

cmd_status() {
    local name
    for name in munged slurmctld slurmd; do
        if [[ -f $STATE/$name.pid ]] && alive "$(cat "$STATE/$name.pid")"; then
            echo "$name: running (pid $(cat "$STATE/$name.pid"))"
        else
            echo "$name: not started by this script"
        fi
    done
    if [[ -f $CONF ]]; then SLURM_CONF=$CONF timeout 5 sinfo -N 2>&1 || true; else echo "no $CONF"; fi
}

case ${1:-} in
    install) cmd_install ;;
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 install|up|down|status" >&2
        exit 2
        ;;
esac
