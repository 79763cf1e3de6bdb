"""Reliability scenarios that need their own processes: ``mpiexec -n N python reliability.py CASE``.

* ``leave`` (2 ranks, ``MPICOMM_TIMEOUT`` of at most 3 s): both ranks build a communicator; rank
  1 stays away for 6 s, then leaves with ``sys.exit(0)`` without destroying it (the exit warning
  names it); rank 0's first all_reduce of 128 KiB of floats must end in
  ``CollectiveTimeoutError`` (no untimed collective inside a data call), printed as
  ``rank 0: <type>: <message>``; rank 0 leaves with ``os._exit(0)`` once rank 1 is gone (a
  pending request must not reach ``MPI_Finalize``). Neither rank calls ``MPI_Finalize``: MPICH's
  may wait forever for a rank that never calls it (rank 1 did in 1 of 11 runs, and in a CI run;
  docs/reliability.md).
* ``exhaust`` (any ranks; ``MPICOMM_TIMEOUT`` may be set): communicators of the world are built
  and never destroyed until MPI runs out; the failure must be a ``CommunicationError`` naming the
  cause and the limit, and after destroying them all a new communicator works.
* ``late`` (2 ranks): rank 0 builds a communicator with ``timeout=2``; rank 1 never does. Rank 0
  must get ``CollectiveTimeoutError`` from the constructor within the timeout, printed as
  ``rank 0: <type> after <s> s: <message>``.
* ``init_barrier`` (any ranks, ``TORCH_DIST_INIT_BARRIER=1``): ``init_process_group("mpicomm",
  init_method="mpi://")`` with torch's barrier after it; the last rank arrives 3 s late. Each
  rank prints ``rank R: init took <s> s``: every rank waits for the late one (a real barrier),
  and none waits for the group timeout (60 s).
"""

from __future__ import annotations

import os
import sys
import time

import mpi4py
import torch

if sys.argv[1:2] == ["leave"]:
    mpi4py.rc.finalize = False  # see the docstring
from mpi4py import MPI  # noqa: E402

import mpicomm

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()


def leave() -> int:
    comm = mpicomm.MPICommunicator(WORLD, unique_name="leave")
    if RANK == 1:
        time.sleep(6)
        sys.exit(0)
    try:
        comm.all_reduce(torch.ones(1 << 15))  # 128 KiB of float32
        print("rank 0: the all_reduce completed without rank 1", flush=True)
    except Exception as exc:  # noqa: BLE001 - the outcome is printed
        print(f"rank 0: {type(exc).__name__}: {exc}", flush=True)
    time.sleep(6)  # until rank 1 has left and printed its warning
    os._exit(0)


def exhaust() -> int:
    made = []
    try:
        while len(made) < 5000:
            made.append(mpicomm.MPICommunicator(WORLD, unique_name=f"c{len(made)}"))
        print("never exhausted", flush=True)
    except Exception as exc:  # noqa: BLE001 - the outcome is printed
        print(f"EXHAUSTED {type(exc).__name__} after {len(made)}: {exc}", flush=True)
    for comm in made:
        comm.destroy()
    comm = mpicomm.MPICommunicator(WORLD, unique_name="after")
    size = WORLD.Get_size()
    ok = torch.equal(comm.all_reduce(torch.ones(3)), torch.full((3,), float(size)))
    comm.destroy()
    print("USABLE AGAIN" if ok else "WRONG RESULT", flush=True)
    return 0


def init_barrier() -> int:
    from datetime import timedelta

    import torch.distributed as dist

    if WORLD.Get_size() - 1 == RANK:
        time.sleep(3)
    start = time.monotonic()
    dist.init_process_group("mpicomm", init_method="mpi://", timeout=timedelta(seconds=60))
    print(f"rank {RANK}: init took {time.monotonic() - start:.1f} s", flush=True)
    dist.destroy_process_group()
    return 0


def late() -> int:
    if RANK == 1:
        time.sleep(8)  # never builds it; outlives rank 0's wait
        os._exit(0)
    start = time.monotonic()
    try:
        mpicomm.MPICommunicator(WORLD, unique_name="late", timeout=2)
        print("rank 0: built without rank 1", flush=True)
    except Exception as exc:  # noqa: BLE001 - the outcome is printed
        seconds = time.monotonic() - start
        print(f"rank 0: {type(exc).__name__} after {seconds:.1f} s: {exc}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(
        {"leave": leave, "exhaust": exhaust, "late": late, "init_barrier": init_barrier}[
            sys.argv[1]
        ]()
    )
