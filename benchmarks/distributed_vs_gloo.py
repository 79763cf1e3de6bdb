"""torch.distributed on the mpicomm backend beside gloo, the MPICommunicator it adapts, and raw MPI.

    mpiexec -n 2 python benchmarks/distributed_vs_gloo.py [--json out.json] [--quick]
        [--sizes 4096,262144] [--ops all_reduce,broadcast] [--loop 200]
    python benchmarks/distributed_vs_gloo.py --adapter-cost [--json out.json]

One job, four columns: the default group is gloo (TCP rendezvous on 127.0.0.1);
``dist.new_group(backend="mpicomm")`` adds an mpicomm group over the same ranks (every call through
the public ``torch.distributed`` functions); ``MPICommunicator`` is the same call on an
:class:`mpicomm.MPICommunicator` of the same ranks with the same timeout (what the backend adapts:
the adapter's cost is the ratio ``mpicomm / MPICommunicator``); ``backend`` is the mpicomm group's
own method called directly, as torch's C++ layer calls it (the difference to ``mpicomm`` is
torch's dispatch, the difference to ``MPICommunicator`` the adapter's); ``mpi`` is the plain mpi4py
call on a duplicate of ``COMM_WORLD`` (no shared memory, no checks). For each operation and size the
columns are timed in rotating order, round after round; a round is ``iters`` calls between
barriers and its time is the slowest rank's. The table gives the median call, its 10th percentile
and the fastest call (on a loaded machine the fastest calls show the code's own cost; the JSON
has all three for every column). float32
tensors; the size is the tensor each rank passes (all_gather, gather: each rank's input;
reduce_scatter, all_to_all: the whole input). ``all_gather_single`` and ``reduce_scatter_single``
are torch 2.13's names for ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (``--ops``
takes either; the old names are measured in ``--adapter-cost``).

``--loop N``: each column as blocks of N back-to-back calls instead (no barrier between calls,
as a model's layers call them); the figures are per call, the medians over the rounds' blocks.
With a barrier before every call, skew between the ranks and the first-call costs after a
barrier weigh on the short calls.

``--adapter-cost`` (one process, no communication): each ``dist.*`` call and the group's method
on a 4 KiB tensor with the group's communicator replaced by a stub that returns at once: what
torch's dispatch and the adapter's own code cost per call, apart from any wait for a peer (best
of 7 runs of 2000 calls, the cases interleaved run by run). ``(old name)`` rows: torch 2.13's
deprecated ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` against the current name (the
cost of the wrapper that warns on every call). The same pair for gloo's ``all_reduce``
(``dist.all_reduce`` against its C++ backend's ``allreduce(...).wait()``, one rank) shows torch's dispatch of a C++ backend.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
import warnings
from datetime import datetime, timedelta, timezone

import torch
import torch.distributed as dist
from mpi4py import MPI
from torch._C import _distributed_c10d as c10d

import mpicomm
from mpicomm.bench.env import cpu_line

WORLD = MPI.COMM_WORLD
SIZES = [8, 64, 512, 4096, 32768, 262144, 2 << 20, 16 << 20, 64 << 20]
OPS = (
    "all_reduce",
    "all_gather_single",
    "all_gather",
    "reduce_scatter_single",
    "broadcast",
    "all_to_all_single",
    "gather",
    "barrier",
)
# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor to all_gather_single and
# reduce_scatter_single; the old names still work, through a wrapper that warns on every call
# (its cost: --adapter-cost). The table times the current names, where torch has them.
ALIASES = {
    "all_gather_into_tensor": "all_gather_single",
    "reduce_scatter_tensor": "reduce_scatter_single",
}
ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
COLUMNS = ("gloo", "mpicomm", "backend", "MPICommunicator", "mpi")
TIMEOUT = timedelta(seconds=300)


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
        timeout=TIMEOUT,
    )
    group = dist.new_group(backend="mpicomm", timeout=TIMEOUT)
    comm = mpicomm.MPICommunicator(WORLD, unique_name="bench", timeout=TIMEOUT.total_seconds())
    return dist.group.WORLD, group, comm, WORLD.Dup()


def _opts(kind: str, **fields):
    opts = getattr(c10d, kind)()
    opts.asyncOp = False
    for key, value in fields.items():
        setattr(opts, key, value)
    return opts


def calls(name: str, nbytes: int, gloo, group, comm, raw):
    """``{column: fn()}``: one call of ``name`` on ``nbytes`` per column."""
    world, rank = WORLD.Get_size(), WORLD.Get_rank()
    n = max(world, nbytes // 4 // world * world)  # divisible by the group size
    x = torch.ones(n)
    a = x.numpy()
    out = torch.empty(n * world)
    o = out.numpy()
    part = torch.empty(n // world)
    p = part.numpy()
    if name == "all_reduce":

        def on(g):
            return lambda: dist.all_reduce(x, group=g)

        return {
            "gloo": on(gloo),
            "mpicomm": on(group),
            "backend": lambda: group.allreduce([x], _opts("AllreduceOptions")),
            "MPICommunicator": lambda: comm.all_reduce(x),
            "mpi": lambda: raw.Allreduce(MPI.IN_PLACE, a),
        }
    if name == "all_gather_single":

        def on(g):
            return lambda: ALL_GATHER_SINGLE(out, x, group=g)

        return {
            "gloo": on(gloo),
            "mpicomm": on(group),
            "backend": lambda: group.all_gather_single(out, x, _opts("AllgatherOptions")),
            "MPICommunicator": lambda: comm.all_gather(x, 0),
            "mpi": lambda: raw.Allgather(a, o),
        }
    if name == "all_gather":
        outs = list(out.chunk(world))

        def on(g):
            return lambda: dist.all_gather(outs, x, group=g)

        return {
            "gloo": on(gloo),
            "mpicomm": on(group),
            "backend": lambda: group.allgather([outs], [x], _opts("AllgatherOptions")),
            "MPICommunicator": lambda: comm.all_gather(x, 0),
            "mpi": lambda: raw.Allgather(a, o),
        }
    if name == "reduce_scatter_single":

        def on(g):
            return lambda: REDUCE_SCATTER_SINGLE(part, x, group=g)

        return {
            "gloo": on(gloo),
            "mpicomm": on(group),
            "backend": lambda: group.reduce_scatter_single(part, x, _opts("ReduceScatterOptions")),
            "MPICommunicator": lambda: comm.reduce_scatter(x, 0),
            "mpi": lambda: raw.Reduce_scatter_block(a, p),
        }
    if name == "broadcast":

        def on(g):
            return lambda: dist.broadcast(x, src=0, group=g)

        return {
            "gloo": on(gloo),
            "mpicomm": on(group),
            "backend": lambda: group.broadcast([x], _opts("BroadcastOptions", rootRank=0)),
            "MPICommunicator": lambda: comm.broadcast(x, 0),
            "mpi": lambda: raw.Bcast(a, 0),
        }
    if name == "all_to_all_single":
        y = torch.empty(n)
        b = y.numpy()
        rows = [n // world] * world

        def on(g):
            return lambda: dist.all_to_all_single(y, x, group=g)

        return {
            "gloo": on(gloo),
            "mpicomm": on(group),
            "backend": lambda: group.all_to_all_single(y, x, [], [], _opts("AllToAllOptions")),
            "MPICommunicator": lambda: comm.all_to_allv(x, rows, rows),
            "mpi": lambda: raw.Alltoall(a, b),
        }
    if name == "gather":
        outs = list(out.chunk(world)) if rank == 0 else None

        def on(g):
            return lambda: dist.gather(x, outs, dst=0, group=g)

        return {
            "gloo": on(gloo),
            "mpicomm": on(group),
            "backend": lambda: group.gather(
                [outs] if rank == 0 else [], [x], _opts("GatherOptions", rootRank=0)
            ),
            "MPICommunicator": lambda: comm.gather(x, 0, 0),
            "mpi": lambda: raw.Gather(a, o if rank == 0 else None, 0),
        }

    def barrier_on(g):
        return lambda: dist.barrier(group=g)

    return {
        "gloo": barrier_on(gloo),
        "mpicomm": barrier_on(group),
        "backend": lambda: group.barrier(_opts("BarrierOptions")),
        "MPICommunicator": comm.barrier,
        "mpi": raw.Barrier,
    }


def rotated(columns: tuple | list, r: int) -> list:
    """``columns`` started at the ``r``-th (round ``r``'s order: each column leads in turn)."""
    k = r % len(columns)
    return [*columns[k:], *columns[:k]]


def per_call_times(fns: dict, calls: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of every call of every column on this rank: the columns interleaved call by call
    (so a burst of load on the shared machine hits all of them alike), ``calls`` per column in
    each round, each call started together (a barrier)."""
    times = {c: [] for c in fns}
    for r in range(rounds):
        order = rotated(COLUMNS, r)
        for _ in range(calls):
            for column in order:
                WORLD.Barrier()  # no skew left over from the previous (maybe slower) column
                start = time.perf_counter()
                fns[column]()
                times[column].append(time.perf_counter() - start)
    return times


def loop_times(fns: dict, iters: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every column, from blocks of ``iters`` back-to-back calls (no
    barrier between them: a pipeline of calls, as a model's layers make them), one block per
    column and round, the columns in rotating order; a block's time is the slowest rank's."""
    times = {c: [] for c in fns}
    for r in range(rounds):
        order = rotated(COLUMNS, r)
        for column in order:
            fn = fns[column]
            WORLD.Barrier()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times[column].append(slowest((time.perf_counter() - start) / iters))
    return times


def slowest(value: float) -> float:
    return WORLD.allreduce(value, op=MPI.MAX)


class _Stub:
    """A communicator that returns at once (a preallocated result)."""

    world_size, ranks, broken = 1, [0], None

    def __init__(self, result: torch.Tensor) -> None:
        self.result = result

    def all_reduce(self, x, out=None):
        return x if out is None else out

    def broadcast(self, t, src, out=None):
        return t if out is None else out

    def barrier(self):
        pass

    def all_gather(self, x, dim=0, out=None):
        return self.result if out is None else out

    reduce_scatter = all_gather

    def gather(self, x, dst=0, dim=0, out=None):
        return self.result if out is None else out

    def all_to_allv(self, x, send, recv):
        return self.result


def adapter_cost(path: str | None) -> None:
    """``--adapter-cost``: see the module's docstring."""
    gloo, group, comm, raw = setup()
    gloo_backend = gloo._get_backend(torch.device("cpu"))
    n = 1024
    x, out, part = torch.ones(n), torch.empty(n), torch.empty(n)
    group.communicator, real = _Stub(torch.ones(n)), group.communicator
    g = group
    cases = {
        "all_reduce": (
            lambda: dist.all_reduce(x, group=g),
            lambda: group.allreduce([x], _opts("AllreduceOptions")),
        ),
        "all_gather_single": (
            lambda: ALL_GATHER_SINGLE(out, x, group=g),
            lambda: group.all_gather_single(out, x, _opts("AllgatherOptions")),
        ),
        "all_gather_into_tensor (old name)": (
            lambda: dist.all_gather_into_tensor(out, x, group=g),
            lambda: ALL_GATHER_SINGLE(out, x, group=g),
        ),
        "all_gather": (
            lambda: dist.all_gather([out], x, group=g),
            lambda: group.allgather([[out]], [x], _opts("AllgatherOptions")),
        ),
        "reduce_scatter_single": (
            lambda: REDUCE_SCATTER_SINGLE(part, x, group=g),
            lambda: group.reduce_scatter_single(part, x, _opts("ReduceScatterOptions")),
        ),
        "reduce_scatter_tensor (old name)": (
            lambda: dist.reduce_scatter_tensor(part, x, group=g),
            lambda: REDUCE_SCATTER_SINGLE(part, x, group=g),
        ),
        "broadcast": (
            lambda: dist.broadcast(x, 0, group=g),
            lambda: group.broadcast([x], _opts("BroadcastOptions")),
        ),
        "all_to_all_single": (
            lambda: dist.all_to_all_single(part, x, group=g),
            lambda: group.all_to_all_single(part, x, [], [], _opts("AllToAllOptions")),
        ),
        "gather": (
            lambda: dist.gather(x, [out], dst=0, group=g),
            lambda: group.gather([[out]], [x], _opts("GatherOptions")),
        ),
        "barrier": (
            lambda: dist.barrier(group=g),
            lambda: group.barrier(_opts("BarrierOptions")),
        ),
        "all_reduce (gloo)": (
            lambda: dist.all_reduce(x, group=gloo),
            lambda: gloo_backend.allreduce([x], _opts("AllreduceOptions")).wait(),
        ),
    }

    def run(fn, calls=2000):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls * 1e6

    fastest = {(name, i): float("inf") for name in cases for i in (0, 1)}
    for _ in range(7):  # every case once per run: a burst of load hits them alike
        for name, pair in cases.items():
            for i, fn in enumerate(pair):
                fastest[name, i] = min(fastest[name, i], run(fn))
    rows = []
    for name in cases:
        row = {"op": name, "dist_us": fastest[name, 0], "method_us": fastest[name, 1]}
        rows.append(row)
        second = "current name" if "(old name)" in name else "group method"
        print(f"{name:34s} dist.* {row['dist_us']:7.2f} us  {second} {row['method_us']:7.2f} us")
    group.communicator = real
    comm.destroy()
    raw.Free()
    if path:
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_line(),
            "load": os.getloadavg()[0],
        }
        with open(path, "w") as f:
            json.dump({"meta": meta, "adapter_cost": rows}, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    ap.add_argument("--sizes", help="comma-separated bytes (default: 8 B to 64 MiB)")
    ap.add_argument("--ops", help=f"comma-separated, from {','.join(OPS)}")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--adapter-cost", action="store_true", help="one process, no communication")
    ap.add_argument(
        "--loop", type=int, default=0, help="time blocks of N back-to-back calls (see loop_times)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives
    if args.adapter_cost:
        adapter_cost(args.json)
        return
    gloo, group, comm, raw = setup()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else SIZES
    ops = [ALIASES.get(o, o) for o in args.ops.split(",")] if args.ops else OPS
    rounds = 2 if args.quick else args.rounds
    rows = []
    for name in ops:
        for nbytes in [0] if name == "barrier" else sizes:
            fns = calls(name, nbytes, gloo, group, comm, raw)
            calls_per_round = max(2, min(20, (8 << 20) // max(nbytes, 1) // 16))
            for fn in fns.values():  # warm-up: buffers, first-call costs
                for _ in range(3):
                    fn()
            if args.loop:
                times = loop_times(fns, args.loop, rounds)
            else:
                times = per_call_times(fns, calls_per_round, rounds)
            us = {c: slowest(statistics.median(t)) * 1e6 for c, t in times.items()}
            low = {c: slowest(statistics.quantiles(t, n=10)[0]) * 1e6 for c, t in times.items()}
            best = {c: slowest(min(t)) * 1e6 for c, t in times.items()}
            row = {"op": name, "bytes": nbytes, **{f"{c}_us": v for c, v in us.items()}}
            row.update({f"{c}_p10_us": v for c, v in low.items()})
            row.update({f"{c}_best_us": v for c, v in best.items()})
            row["adapter_ratio"] = us["mpicomm"] / us["MPICommunicator"]
            row["adapter_ratio_p10"] = low["mpicomm"] / low["MPICommunicator"]
            row["adapter_ratio_best"] = best["mpicomm"] / best["MPICommunicator"]
            row["backend_ratio"] = us["backend"] / us["MPICommunicator"]
            row["gloo_over_mpicomm"] = us["gloo"] / us["mpicomm"]
            rows.append(row)
            if WORLD.Get_rank() == 0:
                print(
                    f"{name:22s} {nbytes:>9d} B  "
                    + "  ".join(f"{c} {us[c]:9.1f}" for c in COLUMNS)
                    + f"  us  adapter x{row['adapter_ratio']:.2f} "
                    + f"(p10 {low['mpicomm']:.1f} / {low['MPICommunicator']:.1f} us, "
                    + f"best {best['mpicomm']:.1f} / {best['MPICommunicator']:.1f} us)",
                    flush=True,
                )
    if WORLD.Get_rank() == 0 and args.json:
        meta = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ranks": WORLD.Get_size(),
            "torch": torch.__version__,
            "mpi": MPI.Get_library_version().splitlines()[0],
            "cpu": cpu_line(),
            "load": os.getloadavg()[0],
            "rounds": rounds,
            "loop": args.loop,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    comm.destroy()
    raw.Free()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
