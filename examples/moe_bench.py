"""Bytes moved and time of MoE dispatch + combine, both backends, at several top-k.

    timeout 300 mpiexec -n 4 python examples/moe_bench.py [--tokens 512] [--hidden 512]

Every rank routes ``--tokens`` random bf16 tokens to ``--experts`` experts (uniform random top-k),
the experts are the identity, and the router's ``dispatch`` + ``combine`` are timed (median of
``--reps`` after one warm-up; the slowest rank's time). Bytes are the payload bytes ranks hand to
other ranks in dispatch + combine (``router.last_bytes``, mean over ranks; rows a rank keeps are
not counted). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mpi4py import MPI

import mpicomm

BACKENDS = ("sparse_alltoallv", "allgather_reducescatter")


def measure(comm, backend, x, ids, weights, num_experts, reps):
    router = comm.expert_router(num_experts, backend=backend)
    times = []
    for i in range(reps + 1):
        comm.cpu_group.Barrier()
        start = time.perf_counter()
        recv = router.dispatch(x, ids, weights)
        router.combine(recv.hidden_states)
        elapsed = comm.cpu_group.allreduce(time.perf_counter() - start, op=MPI.MAX)
        if i:
            times.append(elapsed)
    moved = comm.cpu_group.allreduce(sum(router.last_bytes.values())) / comm.world_size
    return moved, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--timeout", type=float, default=0, help="communicator timeout in s (0: blocking MPI calls)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    comm = mpicomm.MPICommunicator(timeout=args.timeout)
    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(torch.bfloat16)
    if comm.rank == 0:
        print(
            f"W={comm.world_size}, {args.tokens} bf16 tokens/rank, hidden {args.hidden}, "
            f"{args.experts} experts; bytes = payload one rank hands to others (mean); "
            f"time = dispatch+combine, slowest rank, median of {args.reps}; "
            f"timeout {args.timeout:g} s\n"
        )
        print("| top-k | sparse MiB/rank | allgather MiB/rank | ratio | sparse ms | allgather ms |")
        print("|---:|---:|---:|---:|---:|---:|")
    for k in args.topk:
        ids = torch.stack(
            [torch.randperm(args.experts, generator=g)[:k] for _ in range(args.tokens)]
        )
        weights = torch.softmax(torch.randn(args.tokens, k, generator=g), -1)
        (sb, st), (gb, gt) = (
            measure(comm, b, x, ids, weights, args.experts, args.reps) for b in BACKENDS
        )
        if comm.rank == 0:
            ratio = f"{gb / sb:.1f}x" if sb else "-"
            print(
                f"| {k} | {sb / 2**20:.2f} | {gb / 2**20:.2f} | {ratio} "
                f"| {st * 1e3:.2f} | {gt * 1e3:.2f} |",
                flush=True,
            )
    comm.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
