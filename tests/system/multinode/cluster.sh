#!/bin/bash
# Simulated cluster: N hosts on one machine, each a network namespace with its own address on a
# private bridge, its own hostname, boot id, /tmp, /dev/shm and /etc/hosts.
#
#   cluster.sh up [N]    create hosts mcnode1..mcnodeN (default 2) on 10.213.0.0/24
#   cluster.sh down      delete everything `up` created (safe to run any number of times)
#   cluster.sh status    list the hosts and their interface counters
#   cluster.sh bytes     total bytes sent on the hosts' network interfaces (sum of tx over hosts)
#
# Nothing is added to the root network namespace: the bridge lives in its own namespace
# (mcswitch), each host is joined to it by a veth pair, and deleting the namespaces deletes every
# interface. State (hosts file, per-host boot id, tmp, shm) lives in a tmpfs at $MCMN_STATE that
# `down` unmounts. Run commands on a host with `hostexec HOST CMD...`.
set -euo pipefail

STATE=${MCMN_STATE:-/run/mpicomm-multinode}
PREFIX=mcnode
SWITCH=mcswitch
SUBNET=10.213.0

die() { echo "cluster.sh: $*" >&2; exit 1; }

hosts() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" | sort -V || true
}

down() {
    local h
    for h in $(hosts); do ip netns delete "$h" 2>/dev/null || true; done
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$SWITCH"; then
        ip netns delete "$SWITCH" 2>/dev/null || true
    fi
    if mountpoint -q "$STATE" 2>/dev/null; then umount -l "$STATE" || true; fi
    rmdir "$STATE" 2>/dev/null || true
}

up() {
    local n=${1:-2} i h
    [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= 200 )) || die "host count must be 1..200, got '$n'"
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
    [ -z "$(hosts)" ] || die "a cluster is already up ($(hosts | tr '\n' ' ')); run 'down' first"
    trap 'rc=$?; if [ $rc -ne 0 ]; then down; fi' EXIT
    mkdir -p "$STATE"
    mount -t tmpfs -o size=4g,mode=0755 mpicomm-multinode "$STATE"
    printf '127.0.0.1 localhost\n' > "$STATE/hosts"
    ip netns add "$SWITCH"
    ip -n "$SWITCH" link set lo up
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
    for i in $(seq 1 "$n"); do
        h=$PREFIX$i
        ip netns add "$h"
        ip -n "$h" link set lo up
        # veth pair: "eth0" inside the host, "p$i" as a port on the switch's bridge
        ip link add "mcmn-p$i" netns "$SWITCH" type veth peer name eth0 netns "$h"
        ip -n "$SWITCH" link set "mcmn-p$i" master br0 up
        ip -n "$h" addr add "$SUBNET.$i/24" dev eth0
        ip -n "$h" link set eth0 up
        printf '%s.%s %s\n' "$SUBNET" "$i" "$h" >> "$STATE/hosts"
        mkdir -p "$STATE/$h/tmp" "$STATE/$h/shm"
        chmod 1777 "$STATE/$h/tmp" "$STATE/$h/shm"
        # each host its own kernel boot id, so UCX does not treat hosts as one machine
        cat /proc/sys/kernel/random/uuid > "$STATE/$h/boot_id"
    done
    # each host reaches the next: a TCP connect to a closed port must be refused (not time out)
    local peer err
    for i in $(seq 1 "$n"); do
        peer=$SUBNET.$(( i % n + 1 ))
        err=$(ip netns exec "$PREFIX$i" timeout 5 bash -c "echo > /dev/tcp/$peer/9" 2>&1 || true)
        [[ $err == *refused* ]] || die "$PREFIX$i cannot reach $peer: ${err:-timed out}"
    done
    trap - EXIT
    hosts | tr '\n' ' '; echo
}

bytes() {
    local h total=0 b
    for h in $(hosts); do
        b=$(ip netns exec "$h" awk -F'[: ]+' '$2=="eth0"{print $11}' /proc/net/dev)
        total=$(( total + b ))
    done
    echo "$total"
}

status() {
    local h
    for h in $(hosts); do
        echo "== $h $(ip -n "$h" -4 -o addr show dev eth0 | awk '{print $4}')"
        ip netns exec "$h" grep -E 'eth0' /proc/net/dev
    done
}

case "${1:-}" in
    up) up "${2:-2}" ;;
    down) down ;;
    status) status ;;
    bytes) bytes ;;
    *) die "usage: cluster.sh up [N] | down | status | bytes" ;;
esac
