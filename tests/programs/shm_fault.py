"""Run under ``mpiexec -n N`` (N >= 2): a rank that dies or stalls inside a shared-memory collective.

    python tests/programs/shm_fault.py exit|kill|stall|interrupt|interrupt-large|term|late TIMEOUT
    python tests/programs/shm_fault.py die-created|die-mapping|die-mapped|full TIMEOUT

Every rank builds a communicator on shared memory (``shm="1"``, ``timeout=TIMEOUT``) and runs one
all_reduce. Then the last rank leaves: ``exit`` ends its process at once (``os._exit(0)``, no
MPI_Finalize: the launcher lets the others run on), ``kill`` sends itself SIGKILL (the launcher
then ends the job unless told not to), ``stall`` sleeps past the timeout. The other ranks enter a
second all_reduce and must get an error, not spin forever: they print ``SHM_FAULT rank=R error=<class> missing=<ranks> seconds=<wait>`` and the message, then exit.
``interrupt``, ``term`` and ``late`` (see their functions) test the waits instead; ``die-*``
and ``full`` the construction.
Rank 0 also prints ``SHM_FILES <n>``: how many /dev/shm names of this job exist right after
construction (the names are removed at once, so 0), and ``SHM_PREFIX <prefix>`` (how its names
start).
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
from mpicomm.shm import transport  # noqa: E402


def names():
    """How the names of this process's segments start (the job's scheduler id, if any, in it)."""
    return transport.segment_name(os.getpid(), 0, "x")[1:-3]


def die_during_construction(phase):
    """``die-<phase>``: a rank sends itself SIGKILL while the first communicator is built
    (the launcher then ends the job): ``created`` rank 0 right after making the segment,
    ``mapping`` the last rank before mapping it (rank 0 waits for it), ``mapped`` the last rank
    right after. Rank 0 prints ``SHM_PREFIX <prefix>`` first (its segments' names start so)."""
    if rank == 0:
        print(f"SHM_PREFIX {names()}", flush=True)
    world.Barrier()
    real = transport._core.Segment

    def segment(name, world_size, rank_, slot, create):
        dies = (phase == "created" and create) or (phase == "mapped" and rank == size - 1)
        if phase == "mapping" and rank == size - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        made = real(name, world_size, rank_, slot, create)
        if dies:
            os.kill(os.getpid(), signal.SIGKILL)
        return made

    core = transport._core
    transport._core = type(sys)("core")
    transport._core.__dict__.update(core.__dict__, Segment=segment)


def private_shm(nbytes):
    """Give this thread (rank 0's main thread) its own /dev/shm: a tmpfs of nbytes in a mount
    namespace of its own (needs CAP_SYS_ADMIN; gone with the process). Whether it could."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    newns, rec, private = 0x00020000, 1 << 14, 1 << 18
    return (
        libc.unshare(newns) == 0
        and libc.mount(b"none", b"/", None, rec | private, None) == 0
        and libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", 0, f"size={nbytes}".encode()) == 0
    )


def full():
    """``full``: rank 0 creates segments in a /dev/shm with room for one segment and 1 MiB more,
    then every rank builds 3 communicators (``shm="1"`` at 1 rank, else ``"auto"``), keeps them
    and sums 3 MiB on each (direct reads off: MPICOMM_SHM_DIRECT=0 in the environment, so the
    slots are written). Prints ``SHM_FULL <shm|mpi|refused>...`` (``-wrong`` after a wrong
    sum) from rank 0 for every rank (``; `` between ranks), or ``SHM_FULL skipped`` where no private /dev/shm can be mounted."""
    seg_bytes = 4096 + size * 2 * transport.SLOT_BYTES
    can = private_shm(seg_bytes + (1 << 20)) if rank == 0 else True
    if not world.allreduce(can, op=MPI.LAND):
        print("SHM_FULL skipped", flush=True)
        os._exit(0)
    kept, seen = [], []
    for i in range(3):
        try:
            c = mpicomm.MPICommunicator(
                world, shm="1" if size == 1 else "auto", unique_name=f"f{i}"
            )
        except mpicomm.CommunicationError:
            seen.append("refused")
            continue
        x = torch.full((3 << 18,), float(rank + 1))
        right = torch.equal(c.all_reduce(x), torch.full_like(x, size * (size + 1) / 2))
        seen.append(("shm" if c.transport is not None else "mpi") + ("" if right else "-wrong"))
        kept.append(c)
    everyone = world.gather(" ".join(seen), root=0)  # one line: hydra may split ranks' lines
    if rank == 0:
        print("SHM_FULL " + "; ".join(everyone), flush=True)
    world.Barrier()
    os._exit(0)


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
    """The last rank enters an all_reduce 0.2 s after the others; rank 0 prints for each of them
    ``SHM_LATE rank=R cpu=<CPU seconds its process spent in it> wall=<seconds>``, three times."""
    for _ in range(3):
        world.Barrier()
        if rank == size - 1:
            time.sleep(0.2)
        wall, cpu = time.monotonic(), time.process_time()
        comm.all_reduce(x)
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        waits = world.gather((cpu, wall), root=0)  # printed by one rank: lines stay whole
        for r, (cpu, wall) in enumerate(waits[:-1] if rank == 0 else []):
            print(f"SHM_LATE rank={r} cpu={cpu:.4f} wall={wall:.4f}", flush=True)
    world.Barrier()
    os._exit(0)


mode, timeout = sys.argv[1], float(sys.argv[2])
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
if mode.startswith("die-"):
    die_during_construction(mode[4:])
if mode == "full":
    full()
comm = mpicomm.MPICommunicator(world, timeout=timeout, shm="1", unique_name="fault")
if rank == 0:
    mine = [f for f in os.listdir("/dev/shm") if f.startswith(names())]
    print(f"SHM_PREFIX {names()}", flush=True)
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
