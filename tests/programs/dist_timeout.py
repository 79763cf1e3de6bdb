"""Bounded waits of the mpicomm torch backend: ``mpiexec -n 3 python dist_timeout.py OUT``.

Rank 1 stays out of a ``monitored_barrier`` and of an ``all_reduce`` on a group made with
``timeout=2 s``; the other ranks must raise ``CollectiveTimeoutError`` within the bound, and then
that group must refuse every further call at once (a broadcast, a barrier, an all_gather, an
isend: ``CommunicationError``), as a communicator does. Each rank writes
``{case: [error type, missing ranks, seconds]}`` to ``OUT.rank<R>.json``, then the job ends
without MPI_Finalize (the abandoned operations stay pending; the program records rather than hangs).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from mpi4py import MPI

import mpicomm

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
ABSENT = 1
SECONDS = 2.0


def attempt(fn) -> list:
    start = time.monotonic()
    try:
        fn()
        return [None, None, time.monotonic() - start]
    except mpicomm.CollectiveTimeoutError as exc:
        return [type(exc).__name__, exc.missing, time.monotonic() - start]
    except mpicomm.CommunicationError as exc:
        return [type(exc).__name__, "unusable" in str(exc), time.monotonic() - start]


def main(prefix: str) -> None:
    dist.init_process_group("mpicomm", init_method="mpi://", timeout=timedelta(seconds=60))
    timed = dist.new_group(list(range(WORLD.Get_size())), timeout=timedelta(seconds=SECONDS))
    monitored = dist.new_group(list(range(WORLD.Get_size())))
    record = {}
    if RANK != ABSENT:
        record["monitored_barrier"] = attempt(
            lambda: dist.monitored_barrier(
                monitored, timeout=timedelta(seconds=SECONDS), wait_all_ranks=True
            )
        )
        record["all_reduce"] = attempt(lambda: dist.all_reduce(torch.ones(4), group=timed))
        x = torch.ones(4)
        record["then broadcast"] = attempt(lambda: dist.broadcast(x, group_src=0, group=timed))
        record["then barrier"] = attempt(lambda: dist.barrier(group=timed))
        out = torch.empty(12)
        record["then all_gather"] = attempt(
            lambda: dist.all_gather_into_tensor(out, x, group=timed)
        )
        record["then isend"] = attempt(lambda: dist.isend(x, group_dst=1, group=timed))
    with open(f"{prefix}.rank{RANK}.json", "w") as f:
        json.dump(record, f)
    WORLD.Barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
