"""Hierarchical vs flat collectives across hosts, side by side in one run.

Run under mpiexec with ranks on at least two hosts (run.sh: 2 hosts x 2 ranks). For each size and
dtype the two algorithms alternate call by call on one MPICommunicator (``hierarchical`` set to
``"0"`` or ``"1"``); a call's time is the slowest rank's, the figure is the median. Rank 0 also
counts the bytes its host's network interface moved per call (``/proc/net/dev``), which shows how
much each algorithm puts on the network. Every result is checked against the exact sum and for
identical bits on all ranks, and where ``auto`` chooses the hierarchy it must not have put more
bytes on the network than the flat sum (within NET_SLACK); exit status 1 on any failure.

    python hierarchical_bench.py [--sizes 64K,1M,4M] [--reps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from mpi4py import MPI

import mpicomm
from mpicomm.topology import node_topology

# Bytes a call moves besides its payload (the barrier, the timing's allreduce, TCP
# acknowledgements) vary from call to call: the hierarchy may exceed flat by this share of flat's
# bytes plus NET_SLACK_BYTES. float32 moves the same payload either way, and hier/flat still
# ranged 0.992-1.011 at 4 MiB over 11 runs (2026-12-07, docs/multinode.md); 1% failed 2 of them.
NET_SLACK, NET_SLACK_BYTES = 0.03, 4096


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def net_bytes() -> int:
    """rx + tx bytes of every non-loopback interface of this (network namespace's) host."""
    total = 0
    with open("/proc/net/dev") as f:
        for line in f.readlines()[2:]:
            name, data = line.split(":", 1)
            if name.strip() != "lo":
                fields = data.split()
                total += int(fields[0]) + int(fields[8])
    return total


def timed(comm: MPI.Comm, fn) -> tuple[float, object]:
    comm.Barrier()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    return comm.allreduce(dt, op=MPI.MAX), out


def same_everywhere(comm: MPI.Comm, t: torch.Tensor) -> bool:
    mine = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return all(b == mine for b in comm.allgather(mine))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64K,1M,4M")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=0, help="calls per algorithm (0: by size)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    topo = node_topology(world)
    c = mpicomm.MPICommunicator(cpu_group=world)
    failures: list[str] = []
    rows = []
    if rank == 0:
        print(
            f"all_reduce across {topo.num_nodes} hosts x {size // topo.num_nodes} ranks "
            f"(median of per-call max over ranks; net bytes = host {topo.hostname}'s interface)"
        )
        head = f"{'dtype':9} {'bytes':>9} {'flat ms':>9} {'hier ms':>9} {'flat/hier':>9}"
        print(f"{head} {'net B flat':>11} {'net B hier':>11}  auto", flush=True)
    if topo.num_nodes < 2:
        failures.append(f"ranks are on {topo.num_nodes} node(s); this benchmark needs two or more")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for nbytes in map(parse_size, args.sizes.split(",")):
            n = nbytes // dtype.itemsize
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(n, generator=g).to(dtype)
            exact = torch.zeros(n, dtype=torch.float64)
            for r in range(size):
                exact += (
                    torch.randn(n, generator=torch.Generator().manual_seed(r)).to(dtype).double()
                )
            reps = args.reps or max(5, min(15, (16 << 20) // max(nbytes, 1)))
            times = {"flat": [], "hierarchical": []}
            moved = {"flat": 0, "hierarchical": 0}
            for _ in range(reps):
                for algo, how in (("flat", "0"), ("hierarchical", "1")):
                    c.hierarchical = how
                    world.Barrier()  # the last check's gather has left every host
                    b0 = net_bytes()
                    dt, out = timed(world, lambda x=x: c.all_reduce(x))
                    moved[algo] += net_bytes() - b0
                    # no rank starts the check's gather (4 x the payload) before every rank has
                    # read its counters, so none of it can land in the count
                    world.Barrier()
                    times[algo].append(dt)
                    ok = same_everywhere(c.cpu_group, out)
                    err = (out.double() - exact).abs().max().item() if n else 0.0
                    tol = 4 * exact.abs().max().item() * (2e-3 if dtype.itemsize == 2 else 1e-6)
                    if not ok or err > tol:
                        failures.append(f"{algo} {dtype_name} {nbytes}: same={ok} err={err:g}")
            c.hierarchical = "auto"
            chosen = "hierarchical" if c.all_reduce_algorithm(x) == "hierarchical" else "flat"
            flat, hier = (statistics.median(times[a]) for a in ("flat", "hierarchical"))
            row = {
                "dtype": dtype_name,
                "bytes": nbytes,
                "reps": reps,
                "flat_ms": flat * 1e3,
                "hierarchical_ms": hier * 1e3,
                "speedup": flat / hier,
                "flat_net_bytes_per_call": moved["flat"] // reps,
                "hier_net_bytes_per_call": moved["hierarchical"] // reps,
                "auto_chooses": chosen,
            }
            rows.append(row)
            flat_net, hier_net = row["flat_net_bytes_per_call"], row["hier_net_bytes_per_call"]
            if (
                rank == 0
                and chosen == "hierarchical"
                and hier_net > flat_net * (1 + NET_SLACK) + NET_SLACK_BYTES
            ):
                failures.append(
                    f"auto chooses the hierarchy for {dtype_name} {nbytes}, which put {hier_net} "
                    f"bytes per call on the network against flat's {flat_net}"
                )
            if rank == 0:
                print(
                    f"{row['dtype']:9} {row['bytes']:>9} {row['flat_ms']:>9.3f} "
                    f"{row['hierarchical_ms']:>9.3f} {row['speedup']:>9.2f} "
                    f"{row['flat_net_bytes_per_call']:>11} {row['hier_net_bytes_per_call']:>11}  "
                    f"{row['auto_chooses']}",
                    flush=True,
                )
    c.destroy()
    failures = sum(world.allgather(failures), [])
    if rank == 0:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"hosts": topo.num_nodes, "ranks": size, "rows": rows}, f, indent=1)
        for f in sorted(set(failures)):
            print("FAIL:", f)
        print("hierarchical: ok" if not failures else "hierarchical: FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
