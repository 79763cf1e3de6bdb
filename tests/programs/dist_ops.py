"""Every torch.distributed operation on seeded inputs, under one backend; results to a file.

``mpiexec -n N python tests/programs/dist_ops.py BACKEND OUT``: BACKEND is ``mpicomm`` (``mpi://``)
or ``gloo`` (a TCP rendezvous on 127.0.0.1, port chosen by rank 0 and shared over MPI). Each rank
saves ``{case: tensor or "unsupported: <error>"}`` to ``OUT.rank<R>.pt``;
tests/jobs/test_distributed_gloo.py compares the two backends case by case.
"""

from __future__ import annotations

import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from mpi4py import MPI

import mpicomm  # noqa: F401  (registers the backend)

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def data(rank, shape, dtype, low=-4, high=5):
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(low, high, shape, generator=g).to(dtype)


def init(backend: str) -> None:
    timeout = timedelta(seconds=60)
    if backend == "mpicomm":
        dist.init_process_group("mpicomm", init_method="mpi://", timeout=timeout)
        return
    port = None
    if RANK == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = WORLD.bcast(port, root=0)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=RANK, world_size=SIZE, timeout=timeout
    )


def cases():
    """``name -> function returning the tensor(s) to compare``."""
    out = {}
    for op in ("SUM", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR"):
        for dtype in (torch.float32, torch.float64, torch.int32, torch.int64, torch.bfloat16):
            if op.startswith("B") and dtype.is_floating_point:
                continue

            def all_reduce(op=op, dtype=dtype):
                low, high = (1, 3) if op == "PRODUCT" else (-4, 5)
                x = data(RANK, (6, 5), dtype, low, high)
                dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
                return x

            out[f"all_reduce_{op}_{dtype}"] = all_reduce

    def reduce():
        xs = []
        for root in range(SIZE):
            x = data(RANK, (9,), torch.int64)
            dist.reduce(x, dst=root)
            xs.append(x if root == RANK else torch.zeros_like(x))  # others: unspecified
        return torch.stack(xs)

    def broadcast():
        xs = []
        for src in range(SIZE):
            x = data(RANK, (4, 3), torch.float32)
            dist.broadcast(x, src=src)
            xs.append(x)
        return torch.stack(xs)

    def all_gather():
        outs = [torch.empty(3, 2) for _ in range(SIZE)]
        dist.all_gather(outs, data(RANK, (3, 2), torch.float32))
        return torch.stack(outs)

    def all_gather_into_tensor():
        out = torch.empty(SIZE * 3, dtype=torch.int32)
        dist.all_gather_into_tensor(out, data(RANK, (3,), torch.int32))
        return out

    def reduce_scatter():
        out = torch.empty(4, dtype=torch.int64)
        dist.reduce_scatter(out, [data(RANK * SIZE + d, (4,), torch.int64) for d in range(SIZE)])
        return out

    def reduce_scatter_tensor():
        out = torch.empty(4, dtype=torch.int64)
        dist.reduce_scatter_tensor(out, data(RANK, (4 * SIZE,), torch.int64))
        return out

    def gather():
        outs = [torch.empty(5) for _ in range(SIZE)] if RANK == 0 else None
        dist.gather(data(RANK, (5,), torch.float32), outs, dst=0)
        return torch.stack(outs) if RANK == 0 else torch.zeros(0)

    def scatter():
        out = torch.empty(3, dtype=torch.int32)
        parts = [data(10 + d, (3,), torch.int32) for d in range(SIZE)] if RANK == 1 % SIZE else None
        dist.scatter(out, parts, src=1 % SIZE)
        return out

    def all_to_all():
        ins = [data(RANK * SIZE + d, (3,), torch.float32) for d in range(SIZE)]
        outs = [torch.empty(3) for _ in range(SIZE)]
        dist.all_to_all(outs, ins)
        return torch.cat(outs)

    def all_to_all_single():
        send = [(RANK + d) % 3 for d in range(SIZE)]
        recv = [(s + RANK) % 3 for s in range(SIZE)]
        out = torch.empty(sum(recv), 2)
        dist.all_to_all_single(out, data(RANK, (sum(send), 2), torch.float32), recv, send)
        return out

    def batch_isend_irecv():
        got = torch.empty(1000)
        ops = [
            dist.P2POp(dist.isend, data(RANK, (1000,), torch.float32), (RANK + 1) % SIZE),
            dist.P2POp(dist.irecv, got, (RANK - 1) % SIZE),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return got

    def objects():
        objs = [None] * SIZE
        dist.all_gather_object(objs, {"r": RANK})
        items = [RANK * 7]
        dist.broadcast_object_list(items, src=SIZE - 1)
        return torch.tensor([o["r"] for o in objs] + items)

    def barrier():
        dist.barrier()
        return torch.ones(1)

    def monitored_barrier():
        dist.monitored_barrier(timeout=timedelta(seconds=30))
        return torch.ones(1)

    for fn in (reduce, broadcast, all_gather, all_gather_into_tensor, reduce_scatter,
               reduce_scatter_tensor, gather, scatter, all_to_all, all_to_all_single,
               batch_isend_irecv, objects, barrier, monitored_barrier):  # fmt: skip
        out[fn.__name__] = fn
    return out


def main(backend: str, prefix: str) -> None:
    init(backend)
    results = {}
    for name, fn in cases().items():
        try:
            results[name] = fn()
        except (RuntimeError, ValueError, TypeError) as exc:
            results[name] = f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        WORLD.Barrier()  # a failed case must not leave a rank inside the next one
    torch.save(results, f"{prefix}.rank{RANK}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
