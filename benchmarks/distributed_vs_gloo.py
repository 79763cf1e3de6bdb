"""torch.distributed on the mpicomm backend vs gloo: all_reduce, all_gather, broadcast, 8 B-64 MiB.

    mpiexec -n 2 python benchmarks/distributed_vs_gloo.py [--json out.json] [--quick]

One job, both backends: the default group is gloo (TCP rendezvous on 127.0.0.1), and
``dist.new_group(backend="mpicomm")`` adds an mpicomm group over the same ranks; every call goes
through the public ``torch.distributed`` functions. For each operation and size the two backends
are timed in alternating rounds (gloo first in even rounds, mpicomm first in odd ones); a round is
``iters`` calls between barriers and its time is the slowest rank's. The table gives the median
round per call and the ratio gloo / mpicomm (above 1: mpicomm is faster). float32 tensors; the
size is the tensor each rank passes (all_gather: each rank's input).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from datetime import datetime, timedelta, timezone

import torch
import torch.distributed as dist
from mpi4py import MPI

import mpicomm  # noqa: F401  (registers the backend)

WORLD = MPI.COMM_WORLD
SIZES = [8, 64, 512, 4096, 32768, 262144, 2 << 20, 16 << 20, 64 << 20]


def setup():
    port = None
    if WORLD.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = WORLD.bcast(port)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=WORLD.Get_rank(),
        world_size=WORLD.Get_size(),
        timeout=timedelta(seconds=300),
    )
    return {"gloo": dist.group.WORLD, "mpicomm": dist.new_group(backend="mpicomm")}


def operation(name: str, nbytes: int):
    n = max(1, nbytes // 4)
    x = torch.ones(n)
    if name == "all_reduce":
        return lambda g: dist.all_reduce(x, group=g)
    if name == "all_gather":
        out = torch.empty(n * WORLD.Get_size())
        return lambda g: dist.all_gather_into_tensor(out, x, group=g)
    return lambda g: dist.broadcast(x, src=0, group=g)


def round_time(fn, group, iters: int) -> float:
    WORLD.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn(group)
    mine = (time.perf_counter() - start) / iters
    return WORLD.allreduce(mine, op=MPI.MAX)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    groups = setup()
    rounds = 3 if args.quick else 7
    rows = []
    for name in ("all_reduce", "all_gather", "broadcast"):
        for nbytes in SIZES:
            fn = operation(name, nbytes)
            iters = max(2, min(200, (8 << 20) // max(nbytes, 1) // 4))
            for g in groups.values():  # warm-up: buffers, first-call costs
                fn(g)
            times = {b: [] for b in groups}
            for r in range(rounds):
                order = list(groups) if r % 2 == 0 else list(groups)[::-1]
                for backend in order:
                    times[backend].append(round_time(fn, groups[backend], iters))
            med = {b: statistics.median(t) for b, t in times.items()}
            rows.append(
                {
                    "op": name,
                    "bytes": nbytes,
                    "gloo_us": med["gloo"] * 1e6,
                    "mpicomm_us": med["mpicomm"] * 1e6,
                    "speedup": med["gloo"] / med["mpicomm"],
                }
            )
            if WORLD.Get_rank() == 0:
                r_ = rows[-1]
                print(
                    f"{name:11s} {nbytes:>10d} B  gloo {r_['gloo_us']:12.1f} us  "
                    f"mpicomm {r_['mpicomm_us']:12.1f} us  x{r_['speedup']:.1f}",
                    flush=True,
                )
    if WORLD.Get_rank() == 0 and args.json:
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ranks": WORLD.Get_size(),
            "torch": torch.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0],
            "rounds": rounds,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
