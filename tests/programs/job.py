"""A small MPI program for the Slurm and launch tests.

    python tests/programs/job.py ok      every rank all-reduces its rank and prints one line
    python tests/programs/job.py raise   rank 1 (the last rank) raises after setting up mpicomm
                                      while the others wait in a barrier
    python tests/programs/job.py thread  the same, but the exception is raised in a worker thread
    python tests/programs/job.py torch   the same as raise, set up by
                                      torch.distributed.init_process_group("mpicomm") (torch
                                      puts its own excepthook around mpicomm's)

The failing modes must end the whole job promptly with a non-zero status: creating the
MPICommunicator installs mpicomm.launch.install_abort_on_exception(), which does that.
"""

from __future__ import annotations

import sys
import threading
import time


def main(mode: str) -> int:
    from mpi4py import MPI

    import mpicomm
    from mpicomm import launch

    # Creating a communicator installs the abort-on-exception hooks: nothing else is needed.
    comm = mpicomm.MPICommunicator(cpu_group=MPI.COMM_WORLD)
    if mode == "torch":
        import torch.distributed as dist

        dist.init_process_group("mpicomm", init_method="mpi://")
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    info = launch.launch_info()
    if mode == "ok":
        total = world.allreduce(rank)
        expect = size * (size - 1) // 2
        status = "PASS" if total == expect else "FAIL"
        sys.stdout.write(
            f"job.py rank {rank}/{size} local {info.local_rank}/{info.local_world_size} "
            f"env={info.env.source} sum={total} {status}\n"
        )
        sys.stdout.flush()
        comm.destroy()
        return 0 if status == "PASS" else 1
    if rank == size - 1:
        time.sleep(0.5)
        if mode == "thread":
            worker = threading.Thread(target=_fail, name="worker")
            worker.start()
            worker.join()
            time.sleep(30)  # the thread hook aborts before this ends
        _fail()
    world.Barrier()  # never completes: the failing rank does not arrive
    return 0


def _fail() -> None:
    raise RuntimeError("deliberate failure in tests/programs/job.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "ok"))
