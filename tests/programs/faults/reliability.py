"""Reliability scenarios that need their own processes: ``mpiexec -n N python reliability.py CASE``.

* ``leave`` (2 ranks, ``MPICOMM_TIMEOUT`` set): both ranks build a communicator; rank 1 leaves
  with ``sys.exit(0)`` without destroying it (the exit warning names it); rank 0's first
  all_reduce of 128 KiB of floats must end in ``CollectiveTimeoutError`` (no untimed collective
  inside a data call), printed as ``rank 0: <type>: <message>``; rank 0 then leaves with
  ``os._exit(0)`` (a pending request must not reach ``MPI_Finalize``).
* ``exhaust`` (1 rank): communicators are built and never destroyed until MPI runs out; the
  failure must be a ``CommunicationError`` naming the cause, and after destroying them all a new
  communicator works.
"""

from __future__ import annotations

import os
import sys

import torch
from mpi4py import MPI

import mpicomm

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()


def leave() -> int:
    comm = mpicomm.MPICommunicator(WORLD, unique_name="leave")
    if RANK == 1:
        sys.exit(0)
    try:
        comm.all_reduce(torch.ones(1 << 15))  # 128 KiB of float32
        print("rank 0: the all_reduce completed without rank 1", flush=True)
    except Exception as exc:  # noqa: BLE001 - the outcome is printed
        print(f"rank 0: {type(exc).__name__}: {exc}", flush=True)
    os._exit(0)


def exhaust() -> int:
    made = []
    try:
        while len(made) < 5000:
            made.append(mpicomm.MPICommunicator(MPI.COMM_SELF, unique_name=f"c{len(made)}"))
        print("never exhausted", flush=True)
    except mpicomm.CommunicationError as exc:
        print(f"EXHAUSTED {type(exc).__name__} after {len(made)}: {exc}", flush=True)
    for comm in made:
        comm.destroy()
    comm = mpicomm.MPICommunicator(MPI.COMM_SELF, unique_name="after")
    ok = torch.equal(comm.all_reduce(torch.ones(3)), torch.ones(3))
    comm.destroy()
    print("USABLE AGAIN" if ok else "WRONG RESULT", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit({"leave": leave, "exhaust": exhaust}[sys.argv[1]]())
