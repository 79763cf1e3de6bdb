"""Where the time of a small ``MPICommunicator.all_reduce`` goes (one process, min over batches).

Run: ``PYTHONPATH=. python benchmarks/profile_small_allreduce.py`` (1 rank, no mpiexec needed).
Only public calls are timed: raw mpi4py ``Allreduce`` on preallocated numpy buffers (the floor),
raw mpi4py as a minimal torch wrapper would call it (numpy views and a fresh output per call),
then ``MPICommunicator.all_reduce`` with and without argument validation (the constructor's
``validate=``) and with each ``allreduce_algo=``, and the other small collectives. The
differences between lines are mpicomm's own costs; docs/benchmarks.md quotes them. The minimum
over many batches of 200 calls keeps the figures usable on a loaded machine.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

import mpicomm
from mpicomm.dtypes import dtype_info


def best(f, batch: int = 200, reps: int = 300) -> float:
    """Minimum over ``reps`` batches of the mean time of one call of ``f``, in microseconds."""
    for _ in range(500):
        f()
    low = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(batch):
            f()
        low = min(low, (time.perf_counter() - t0) / batch)
    return low * 1e6


def show(name: str, f) -> None:
    print(f"{name:56s} {best(f):7.2f} us")


def main() -> None:
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    raw = world.Dup()
    x, half = torch.ones(2), torch.ones(2, dtype=torch.bfloat16)
    xs, ys = x.numpy(), np.empty(2, np.float32)

    def wrapped(t=x):
        # What a minimal torch wrapper over mpi4py does: views, a fresh output, the call.
        carrier = dtype_info(t.dtype).carrier
        out = torch.empty_like(t)
        raw.Allreduce(t.view(carrier).numpy(), out.view(carrier).numpy(), MPI.SUM)
        return out

    comms = {
        "default": mpicomm.MPICommunicator(world, unique_name="profile"),
        "validate=False": mpicomm.MPICommunicator(
            world, unique_name="profile:novalidate", validate=False
        ),
        **{
            f"allreduce_algo={algo!r}": mpicomm.MPICommunicator(
                world, unique_name=f"profile:{algo}", allreduce_algo=algo
            )
            for algo in ("native", "bytes")
        },
    }
    show("raw Allreduce on numpy (preallocated)", lambda: raw.Allreduce(xs, ys, MPI.SUM))
    show("raw Allreduce + numpy views + fresh output", wrapped)
    for label, c in comms.items():
        show(f"all_reduce fp32, {label}", lambda c=c: c.all_reduce(x))
    for label in ("default", "allreduce_algo='bytes'"):
        c = comms[label]
        show(f"all_reduce bf16, {label}", lambda c=c: c.all_reduce(half))
    c = comms["default"]
    for name, call in (
        ("all_gather fp32 (dim 0)", lambda: c.all_gather(x, 0)),
        ("reduce_scatter fp32 (dim 0)", lambda: c.reduce_scatter(x, 0)),
        ("broadcast fp32", lambda: c.broadcast(x, 0)),
    ):
        show(name, call)
    shape, dtype, device = x.shape, x.dtype, x.device
    show(
        "  torch.empty(shape, dtype, device)",
        lambda: torch.empty(shape, dtype=dtype, device=device),
    )
    show("  torch.empty_like(x)", lambda: torch.empty_like(x))
    for c in comms.values():
        c.destroy()
    raw.Free()


if __name__ == "__main__":
    main()
