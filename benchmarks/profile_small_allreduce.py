"""Where the time of a small ``MPICommunicator.all_reduce`` goes (one process, min over batches).

Run: ``PYTHONPATH=. python benchmarks/profile_small_allreduce.py`` (1 rank, no mpiexec needed).
Each "+" line adds one step of ``MPICommunicator.all_reduce``'s body (mpicomm/communicator.py),
so differences between lines are the cost of each step. The minimum over many batches of 200
calls keeps the figures usable on a loaded machine. The last lines time the cheaper forms of the
two most expensive steps (buffer spec and output allocation).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

import mpicomm
from mpicomm import buffers, reduction, validation


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


def numpy_spec(tensor: torch.Tensor) -> list:
    """The spec mpicomm built before 2026-11-24: a numpy view instead of the memory's address."""
    info = buffers.DTYPES[tensor.dtype]
    t = tensor if info.carrier is tensor.dtype else tensor.view(info.carrier)
    return [t.numpy(), info.mpi]


def main() -> None:
    torch.set_num_threads(1)
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD)
    raw = MPI.COMM_WORLD.Dup()
    x, out = torch.ones(2), torch.empty(2)
    xs, ys = x.numpy(), np.empty(2, np.float32)
    info = buffers.dtype_info(x.dtype)

    def upto(n):
        def run():
            steps = (
                lambda: validation.check_tensor(x),
                lambda: validation.check_device(x, c.device),
                lambda: c._begin("all_reduce", None),
                lambda: c._stage_in(x),
                lambda: torch.empty_like(x),
                lambda: reduction.choose_allreduce(info, x.numel() * 4, c.allreduce_algo),
                lambda: reduction.all_reduce_native(
                    c._call, "all_reduce", c.device_group, x, out, info
                ),
            )
            for step in steps[:n]:
                step()

        return run

    names = [
        "check_tensor",
        "check_device",
        "_begin",
        "_stage_in",
        "output (torch.empty_like, as all_reduce on CPU)",
        "choose_allreduce",
        "all_reduce_native (2 mpi_spec + Caller + MPI)",
    ]
    print(f"{'raw Allreduce on numpy':52s} {best(lambda: raw.Allreduce(xs, ys, MPI.SUM)):6.2f} us")
    for n, name in enumerate(names, 1):
        print(f"{'+ ' + name:52s} {best(upto(n)):6.2f} us")
    print(f"{'MPICommunicator.all_reduce':52s} {best(lambda: c.all_reduce(x)):6.2f} us")
    half = torch.ones(2, dtype=torch.bfloat16)
    print(
        f"{'MPICommunicator.all_reduce (bf16, bytes algorithm)':52s} "
        f"{best(lambda: c.all_reduce(half)):6.2f} us"
    )
    for name, call in (
        ("all_gather (dim 0)", lambda: c.all_gather(x, 0)),
        ("reduce_scatter (dim 0)", lambda: c.reduce_scatter(x, 0)),
        ("broadcast", lambda: c.broadcast(x, 0)),
    ):
        print(f"{'MPICommunicator.' + name:52s} {best(call):6.2f} us")
    print(f"{'  mpi_spec(x)':52s} {best(lambda: buffers.mpi_spec(x)):6.2f} us")
    print(f"{'  numpy-view spec (before 2026-11-24)':52s} {best(lambda: numpy_spec(x)):6.2f} us")
    shape, dtype, device = x.shape, x.dtype, x.device
    print(
        f"{'  torch.empty(shape, dtype, device)':52s} "
        f"{best(lambda: torch.empty(shape, dtype=dtype, device=device)):6.2f} us"
    )
    print(f"{'  torch.empty_like(x)':52s} {best(lambda: torch.empty_like(x)):6.2f} us")
    c.destroy()
    raw.Free()


if __name__ == "__main__":
    main()
