"""Run under ``mpiexec -n N`` (N >= 2): a rank that dies or stalls inside a shared-memory collective.

    python tests/programs/shm_fault.py exit|kill|stall|interrupt|interrupt-large|term|late TIMEOUT

Every rank builds a communicator on shared memory (``shm="1"``, ``timeout=TIMEOUT``) and runs one
all_reduce. Then the last rank leaves: ``exit`` ends its process at once (``os._exit(0)``, no
MPI_Finalize: the launcher lets the others run on), ``kill`` sends itself SIGKILL (the launcher
then ends the job unless told not to), ``stall`` sleeps past the timeout. The other ranks enter a
second all_reduce and must get an error, not spin forever: they print ``SHM_FAULT rank=R error=<class> missing=<ranks> seconds=<wait>`` and the message, then exit.
``interrupt``, ``term`` and ``late`` (see their functions) test the waits instead.
Rank 0 also prints ``SHM_FILES <n>``: how many /dev/shm names of this job exist right after
construction (the names are unlinked at once, so 0), and ``SHM_PID <pid>`` (part of the name).
"""

import os
import signal
import sys
import threading
import time

import torch

torch.set_num_threads(1)

from mpi4py import MPI  # noqa: E402

import mpicomm  # noqa: E402


def interrupt():
    """Rank 0 waits in an all_reduce the last rank never enters and gets SIGINT (``interrupt``;
    ``interrupt-large``: a message whose call releases the GIL) or SIGTERM with a handler that
    raises SystemExit (``term``) 0.3 s in; it prints ``SHM_SIGNAL error=<class> seconds=<from the
    signal to the exception> refused=<the next call's error>``."""
    if rank == 0:
        n = 100_000 if mode.endswith("large") else 1000
        sig = signal.SIGTERM if mode == "term" else signal.SIGINT
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
        sent = []
        timer = threading.Timer(
            0.3, lambda: (sent.append(time.monotonic()), os.kill(os.getpid(), sig))
        )
        timer.start()
        try:
            comm.all_reduce(torch.ones(n))
            error = "none"
        except BaseException as exc:
            error = type(exc).__name__
        seconds = time.monotonic() - sent[0] if sent else -1
        try:
            comm.all_reduce(torch.ones(n))
            refused = "none"
        except mpicomm.CommunicationError as exc:
            refused = "CommunicationError" if "unusable" in str(exc) else str(exc)
        print(
            f"SHM_SIGNAL error={error} seconds={seconds:.3f} refused={refused} "
            f"broken={comm.broken is not None}",
            flush=True,
        )
    world.Barrier()
    os._exit(0)


def late():
    """The last rank enters an all_reduce 0.2 s after the others, which print ``SHM_LATE
    rank=R cpu=<CPU seconds this process spent in it> wall=<seconds>``, three times."""
    for _ in range(3):
        world.Barrier()
        if rank == size - 1:
            time.sleep(0.2)
        wall, cpu = time.monotonic(), time.process_time()
        comm.all_reduce(x)
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        if rank != size - 1:
            print(f"SHM_LATE rank={rank} cpu={cpu:.4f} wall={wall:.4f}", flush=True)
    world.Barrier()
    os._exit(0)


mode, timeout = sys.argv[1], float(sys.argv[2])
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
comm = mpicomm.MPICommunicator(world, timeout=timeout, shm="1", unique_name="fault")
if rank == 0:
    mine = [f for f in os.listdir("/dev/shm") if f.startswith(f"mpicomm-job-{os.getpid()}-")]
    print(f"SHM_PID {os.getpid()}", flush=True)
    print(f"SHM_FILES {len(mine)}", flush=True)
x = torch.ones(1000, dtype=torch.bfloat16)
assert torch.equal(comm.all_reduce(x), x * size)
world.Barrier()
if mode.startswith(("interrupt", "term")):
    interrupt()
if mode == "late":
    late()
if rank == size - 1:
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "exit":
        os._exit(0)
    time.sleep(timeout + 2)  # stall: outlive the others' timeout
    os._exit(0)
start = time.monotonic()
try:
    comm.all_reduce(x)
    print(f"SHM_FAULT rank={rank} error=none", flush=True)
except mpicomm.CommunicationError as exc:
    missing = getattr(exc, "missing", None)
    print(
        f"SHM_FAULT rank={rank} error={type(exc).__name__} missing={missing} "
        f"seconds={time.monotonic() - start:.2f}",
        flush=True,
    )
    print(f"SHM_MESSAGE rank={rank} {exc}", flush=True)
    assert comm.broken is not None
os._exit(0)
