"""Run under ``mpiexec -n N`` (N >= 2): a rank that dies or stalls inside a shared-memory collective.

    python tests/programs/shm_fault.py exit|kill|stall TIMEOUT

Every rank builds a communicator on shared memory (``shm="1"``, ``timeout=TIMEOUT``) and runs one
all_reduce. Then the last rank leaves: ``exit`` ends its process at once (``os._exit(0)``, no
MPI_Finalize: the launcher lets the others run on), ``kill`` sends itself SIGKILL (the launcher
then ends the job unless told not to), ``stall`` sleeps past the timeout. The other ranks enter a
second all_reduce and must get an error, not spin forever: they print ``SHM_FAULT rank=R error=<class> missing=<ranks> seconds=<wait>`` and the message, then exit.
Rank 0 also prints ``SHM_FILES <n>``: how many /dev/shm names of this job exist right after
construction (the names are unlinked at once, so 0), and ``SHM_PID <pid>`` (part of the name).
"""

import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)

from mpi4py import MPI  # noqa: E402

import mpicomm  # noqa: E402

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
