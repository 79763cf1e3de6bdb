"""Node topology across simulated hosts: every rank checks its local rank/size and node index.

Run with ranks spread over hosts (e.g. 2 hosts x 2 ranks). The expected layout is derived from the
hostnames each rank reports (gethostname, which differs per simulated host), independently of the
MPI shared-memory split that mpicomm.topology uses; rank 0 prints one line per rank and
``topology: ok`` or raises. ``--expect-nodes N --expect-per-node M`` pin the expected shape.
"""

from __future__ import annotations

import argparse
import socket
import sys

from mpi4py import MPI


def observed(comm):
    try:
        from mpicomm.topology import default_device, node_topology
    except ImportError:  # the core is not there yet: the same split, by hand
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
        leader = local.bcast(comm.rank, root=0)
        out = (local.rank, local.size, sorted(set(comm.allgather(leader))).index(leader))
        local.Free()
        return (*out, "cpu", "raw-mpi")
    topo = node_topology(comm)
    return (
        topo.local_rank,
        topo.local_size,
        topo.node_index,
        str(default_device(topo.local_rank)),
        "mpicomm",
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect-nodes", type=int, required=True)
    parser.add_argument("--expect-per-node", type=int, required=True)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    host = socket.gethostname()
    got = observed(comm)
    rows = comm.gather((comm.rank, host, MPI.Get_processor_name(), *got), root=0)
    if comm.rank != 0:
        return 0
    hosts_in_order = list(dict.fromkeys(r[1] for r in rows))  # ordered by lowest rank
    errors = []
    for rank, hostname, procname, lrank, lsize, node, device, source in rows:
        peers = [r[0] for r in rows if r[1] == hostname]
        want = (peers.index(rank), len(peers), hosts_in_order.index(hostname))
        ok = (lrank, lsize, node) == want
        print(
            f"rank {rank}: host {hostname} (processor name {procname}) local_rank {lrank}/"
            f"{lsize} node {node} device {device} [{source}] {'ok' if ok else f'WANT {want}'}"
        )
        if not ok:
            errors.append(rank)
    if len(hosts_in_order) != args.expect_nodes:
        errors.append(f"{len(hosts_in_order)} hosts, expected {args.expect_nodes}")
    if any(r[4] != args.expect_per_node for r in rows):
        errors.append(f"local sizes {[r[4] for r in rows]}, expected {args.expect_per_node}")
    if errors:
        print(f"topology: FAILED {errors}")
        return 1
    print("topology: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
