"""Direct reads against the segment's slots for large shared-memory collectives, alternated.

    PYTHONPATH=. OMP_NUM_THREADS=1 timeout 900 mpiexec -n 2 -bind-to core python \\
        benchmarks/shm_direct.py [--dtypes f32,bf16] [--sizes 262144,1048576,4194304,16777216]
        [--rounds 12] [--calls 10]

One job, one one-node ``MPICommunicator``; its transport's ``direct_from`` is switched between
``0`` (every call reads peers' tensors with ``process_vm_readv``: docs/shm.md, "Direct reads")
and never (every call copies through the segment's slots), round by round in alternating order,
so a burst of load hits both alike. Per op, dtype and size (bytes of the input; all_gather: of
the result): the median time of one call over every call of every round, the slower rank's, and
the ratio direct / segment (< 1: direct reads faster). ``transport.DIRECT_FROM`` is chosen from
these ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
MODES = {"direct": 0, "segment": None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--sizes", default="262144,1048576,4194304,16777216")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--calls", type=int, default=10, help="timed calls per round and mode")
    args = p.parse_args()

    torch.set_num_threads(1)
    from mpi4py import MPI

    import mpicomm
    from mpicomm.bench.env import cpu_line

    world = MPI.COMM_WORLD
    comm = mpicomm.MPICommunicator(world)
    shm = comm.transport
    if shm is None or shm.direct_from is None:
        if world.rank == 0:
            print("no shared-memory transport with direct reads here (python -m mpicomm info)")
        comm.destroy()
        return
    ops = {
        "all_reduce": lambda x: comm.all_reduce(x),
        "all_gather": lambda x: comm.all_gather(x[: x.numel() // world.size], 0),
        "reduce_scatter": lambda x: comm.reduce_scatter(x, 0),
        "broadcast": lambda x: comm.broadcast(x, 0),
    }
    rows = []
    for short in args.dtypes.split(","):
        dtype = DTYPES[short]
        for op, call in ops.items():
            for nbytes in (int(s) for s in args.sizes.split(",")):
                x = torch.randn(nbytes // dtype.itemsize).to(dtype)
                times = {mode: [] for mode in MODES}
                for r in range(args.rounds):
                    for mode in list(MODES) if r % 2 == 0 else list(MODES)[::-1]:
                        shm.direct_from = MODES[mode]
                        world.Barrier()
                        for _ in range(args.calls):
                            t0 = time.perf_counter()
                            call(x)
                            times[mode].append(time.perf_counter() - t0)
                med = {
                    m: world.allreduce(statistics.median(v), op=MPI.MAX) for m, v in times.items()
                }
                rows.append((short, op, nbytes, med["direct"], med["segment"]))
    comm.destroy()
    if world.rank == 0:
        print(
            f"# shared-memory direct reads vs slots, {world.size} ranks, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()} "
            f"({os.cpu_count()} cpus, {cpu_line()}), "
            f"load {os.getloadavg()[0]:.1f}, {args.rounds} alternated rounds"
        )
        print("| dtype | op | bytes | direct (us) | segment (us) | direct / segment |")
        print("|---|---|---:|---:|---:|---:|")
        for short, op, nbytes, direct, segment in rows:
            print(
                f"| {short} | {op} | {nbytes >> 10} KiB | {direct * 1e6:.1f} | "
                f"{segment * 1e6:.1f} | {direct / segment:.2f} |"
            )


if __name__ == "__main__":
    main()
