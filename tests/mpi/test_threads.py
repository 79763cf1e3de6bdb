"""Two communicators on the same cpu_group (COMM_WORLD), each driven by its own thread: their
control messages (row counts, fingerprints) must never cross (docs/reliability.md, "Threads").
Validation is on, so every call also exchanges a fingerprint; a timeout bounds every wait."""

import threading

import pytest
import torch
from mpi4py import MPI

import mpicomm
from tests.helpers import everywhere

pytestmark = pytest.mark.mpi

RANK, W = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
CALLS = 60


def rows(step: int, rank: int, which: int) -> int:
    return (step * 7 + rank * 3 + which) % 5 + 1


def block(step: int, rank: int, which: int, cols: int) -> torch.Tensor:
    n = rows(step, rank, which)
    return torch.full((n, cols), float(1000 * which + 10 * step + rank))


def drive(comm, which: int, errors: list) -> None:
    """Alternate dispatch (row counts exchanged on the control communicator) and all_gatherv
    of a list; check every result exactly."""
    cols = 3 + which  # the two threads' tensors differ in width: a crossed message shows
    try:
        for step in range(CALLS):
            every = [block(step, r, which, cols) for r in range(W)]
            mine = every[RANK]
            if step % 2:
                h, lg = comm.dispatch(mine, mine[:, :1])
                ok = torch.equal(h, torch.cat(every))
                ok &= torch.equal(lg, torch.cat([e[:, :1] for e in every]))
            else:
                sizes = [rows(step, r, which) for r in range(W)]
                a, b = comm.all_gatherv([mine, mine.double()], 0, sizes)
                ok = torch.equal(a, torch.cat(every)) and torch.equal(b, torch.cat(every).double())
            if not ok:
                errors.append(f"thread {which}: wrong result at step {step}")
                return
    except Exception as exc:  # noqa: BLE001 - reported by the main thread
        errors.append(f"thread {which}: {type(exc).__name__}: {exc}")


def test_two_communicators_on_one_cpu_group_in_two_threads():
    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE
    comms = [
        mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name=f"thread{i}", validate=True, timeout=60)
        for i in range(2)
    ]
    assert all(c.cpu_group == MPI.COMM_WORLD for c in comms)  # the user's group, unchanged
    errors: list[str] = []
    threads = [threading.Thread(target=drive, args=(c, i, errors)) for i, c in enumerate(comms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is still waiting"
    assert everywhere(not errors), errors
    broken = [c.broken for c in comms]
    for c in comms:
        c.destroy()
    assert broken == [None, None]
