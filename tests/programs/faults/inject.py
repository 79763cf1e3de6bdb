"""Fault injection under mpiexec: ``mpiexec -n K python tests/programs/faults/inject.py CASE OUTDIR``.

Each rank writes what happened to ``OUTDIR/rank<R>.json`` (error type, message, missing ranks,
whether the communicator still worked afterwards) before the job ends, so the test can check every
rank even when the job is aborted. Cases are listed in ``CASES``; each ends the job with a non-zero
status, by an uncaught error on every rank or by ``MPI.COMM_WORLD.Abort``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
from mpi4py import MPI

import mpicomm

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
VICTIM = 1  # the rank that misbehaves
ABORT_GRACE = 2.0  # seconds a rank that timed out waits before aborting, so every rank reports


def record(outdir: str, **fields) -> None:
    path = os.path.join(outdir, f"rank{RANK}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": RANK, **fields}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def failure(exc: BaseException, **extra) -> dict:
    return {
        "error": type(exc).__name__,
        "message": str(exc),
        "missing": getattr(exc, "missing", None),
        **extra,
    }


def abort(code: int = 3) -> None:
    """End the whole job. MPICH's MPI_Abort can return when another rank aborted first: exit then."""
    WORLD.Abort(code)
    os._exit(code)


def abort_after_report(outdir: str, exc: BaseException, grace: float = ABORT_GRACE) -> None:
    """What a job does with a timeout: report, give the other ranks a moment, abort the job."""
    record(outdir, **failure(exc))
    print(f"rank {RANK}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    time.sleep(grace)
    abort(3)


def case_never_enters(comm, outdir):
    """VICTIM never calls the collective; the others time out naming it, then abort the job."""
    if RANK == VICTIM:
        record(outdir, error=None, message="victim: sleeping instead of entering all_reduce")
        time.sleep(600)
        return
    try:
        comm.all_reduce(torch.ones(4))
    except mpicomm.CollectiveTimeoutError as exc:
        abort_after_report(outdir, exc)


def case_raise_before(comm, outdir):
    """VICTIM raises before the collective (no abort hook): the others time out naming it."""
    try:
        if RANK == VICTIM:
            raise RuntimeError("injected failure before all_reduce")
        comm.all_reduce(torch.ones(4))
    except RuntimeError as exc:  # CollectiveTimeoutError is a RuntimeError too
        if isinstance(exc, mpicomm.CollectiveTimeoutError):
            abort_after_report(outdir, exc)
        record(outdir, **failure(exc))
        raise


def case_raise_before_abort(comm, outdir):
    """VICTIM raises before the collective with the launcher's abort hook: the job ends at once."""
    from mpicomm.launch import install_abort_on_exception

    install_abort_on_exception()
    if RANK == VICTIM:
        record(outdir, error="RuntimeError", message="injected failure before all_reduce")
        raise RuntimeError("injected failure before all_reduce")
    comm.all_reduce(torch.ones(4))
    record(outdir, error=None, message="all_reduce returned")


def _mismatches(comm) -> dict:
    """Calls on which VICTIM disagrees with the others, one per kind of disagreement."""
    world = comm.world_size
    victim = RANK == VICTIM
    x = torch.ones(4)
    sizes = [2] * world
    if victim:  # VICTIM believes the last rank has 3 rows
        sizes[-1 if world - 1 != VICTIM else 0] = 3
    return {
        "shape": lambda: comm.all_reduce(torch.ones((4, 5) if victim else (4, 4))),
        "dtype": lambda: comm.all_gather(torch.ones(4, dtype=torch.float64 if victim else None)),
        "sizes": lambda: comm.all_gatherv(torch.ones(2, 3), 0, sizes),
        "dim": lambda: comm.all_gather(torch.ones(2, 2), dim=0 if victim else 1),
        "root": lambda: comm.broadcast(x, src=VICTIM if victim else 0),
        "operation": lambda: comm.all_gather(x) if victim else comm.all_reduce(x),
    }


def case_mismatch(comm, outdir):
    """MPICOMM_VALIDATE=1: each disagreement raises ValueError on every rank, after which the
    communicator still works; at the end the ValueError is left uncaught (non-zero exit)."""
    results = {}
    last = None
    for kind, call in _mismatches(comm).items():
        try:
            call()
            results[kind] = {"error": None}
        except ValueError as exc:
            last = exc
            ok = torch.equal(
                comm.all_reduce(torch.ones(3)), torch.full((3,), float(comm.world_size))
            )
            results[kind] = failure(exc, recovered=bool(ok))
    record(outdir, error=None if last is None else "ValueError", cases=results)
    WORLD.Barrier()  # every rank has recorded before the first uncaught error aborts the job
    if last is not None:
        raise last


def case_recv_wrong_size(comm, outdir):
    """Rank 0 sends 10 then 8 float32; rank 1 expects 8 twice: the first recv raises, the second
    gets the second message intact (the bad one was consumed, nothing was truncated)."""
    if RANK == 0:
        comm.send(torch.arange(10, dtype=torch.float32), dst=VICTIM)
        comm.send(torch.arange(8, dtype=torch.float32) + 100, dst=VICTIM)
        record(outdir, error=None, message="sent")
        return
    if RANK != VICTIM:
        record(outdir, error=None, message="bystander")
        return
    try:
        comm.recv((8,), torch.float32, src=0)
    except mpicomm.CommunicationError as exc:
        nxt = comm.recv((8,), torch.float32, src=0)
        good = torch.equal(nxt, torch.arange(8, dtype=torch.float32) + 100)
        record(outdir, **failure(exc, recovered=bool(good)))
        raise
    record(outdir, error=None, message="no error")


def case_recv_nothing(comm, outdir):
    """VICTIM waits for a message rank 0 never sends: it times out naming rank 0."""
    if RANK != VICTIM:
        record(outdir, error=None, message="not sending")
        time.sleep(600)
        return
    try:
        comm.recv((4,), torch.float32, src=0)
    except mpicomm.CollectiveTimeoutError as exc:
        record(outdir, **failure(exc))
        print(f"rank {RANK}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        abort(3)


def case_sigkill(comm, outdir):
    """VICTIM is killed by SIGKILL in the middle of a stream of all_reduces (no timeout set)."""
    x = torch.ones(1024)
    for step in range(1_000_000):
        if RANK == VICTIM and step == 50:
            record(outdir, error="SIGKILL", message=f"killed at step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
        comm.all_reduce(x)
        if step == 0:
            record(outdir, error=None, message="running")


def case_unvalidated(comm, outdir):
    """MPICOMM_VALIDATE off, VICTIM passes a bigger all_reduce / all_gather / broadcast than the
    others (which one: argv[3]). Whatever MPI does is recorded; a timeout bounds a hang."""
    kind = sys.argv[3]
    n = 6 if RANK == VICTIM else 4
    x = torch.arange(n, dtype=torch.float32) + 1
    try:
        if kind == "all_reduce":
            out = comm.all_reduce(x)
        elif kind == "all_gather":
            out = comm.all_gather(x, dim=0)
        elif kind == "broadcast":
            out = comm.broadcast(x, src=VICTIM)
        else:
            out = comm.reduce_scatter(x.repeat(comm.world_size), dim=0)
    except mpicomm.CommunicationError as exc:
        abort_after_report(outdir, exc, grace=0.5)
    record(outdir, error=None, message="returned", result=out.tolist())
    WORLD.Barrier()
    sys.exit(0)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def main() -> None:
    name, outdir = sys.argv[1], sys.argv[2]
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="faults")
    CASES[name](comm, outdir)
    comm.destroy()


if __name__ == "__main__":
    main()
