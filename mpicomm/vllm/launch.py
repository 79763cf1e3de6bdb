"""torch.distributed environment for vLLM's ``external_launcher`` mode under mpirun or srun.

vLLM (``distributed_executor_backend="external_launcher"``) and ``torch.distributed``'s
``env://`` rendezvous read RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. mpicomm
needs the torch rank of every process to equal its rank in ``MPI.COMM_WORLD``; deriving these
variables from MPI guarantees it:

- RANK = ``COMM_WORLD`` rank, WORLD_SIZE = ``COMM_WORLD`` size,
- LOCAL_RANK = rank among the processes on the same node (``Split_type(COMM_TYPE_SHARED)``),
- MASTER_ADDR = ``127.0.0.1`` when all ranks share one node, else rank 0's host address,
- MASTER_PORT = a free TCP port picked on rank 0 (both kept when already set, identical on all
  ranks).

Use it as a wrapper that needs no code change::

    mpiexec -n 4 python -m mpicomm.vllm.launch my_vllm_script.py --args
    srun --mpi=pmi2 -n 4 python -m mpicomm.vllm.launch -m my_package.main --args

or call :func:`export_torch_env` at the top of the script. :func:`torch_env_from_launcher` maps
the launcher's own variables (Open MPI, MPICH/Hydra, Slurm) without initialising MPI.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from collections.abc import Mapping

# (rank, size, local rank) variable names set by common launchers, in order of preference.
_LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def torch_env_from_launcher(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """RANK, WORLD_SIZE and LOCAL_RANK from the launcher's variables, without touching MPI.

    Returns ``None`` when no known launcher variables are present. MASTER_ADDR/PORT are not
    derivable this way (use :func:`torch_env_from_mpi`).
    """
    env = os.environ if environ is None else environ
    for rank_var, size_var, local_var in _LAUNCHER_VARS:
        if rank_var in env and size_var in env:
            out = {"RANK": str(int(env[rank_var])), "WORLD_SIZE": str(int(env[size_var]))}
            if local_var in env:
                out["LOCAL_RANK"] = str(int(env[local_var]))
            return out
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _host_address() -> str:
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def torch_env_from_mpi(comm=None) -> dict[str, str]:
    """The five torch variables for this rank, derived from MPI. Collective over ``comm``.

    ``comm`` defaults to ``MPI.COMM_WORLD`` (vLLM's torch world must be the MPI world for
    mpicomm's rank mapping). Existing MASTER_ADDR/MASTER_PORT of rank 0 are kept and broadcast.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        local_rank = node.Get_rank()
        node_leader = 1 if local_rank == 0 else 0
    finally:
        node.Free()
    num_nodes = comm.allreduce(node_leader, op=MPI.SUM)
    master = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if num_nodes == 1 else _host_address())
        port = os.environ.get("MASTER_PORT") or str(_free_port())
        master = (addr, port)
    addr, port = comm.bcast(master, root=0)
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }


def export_torch_env(comm=None) -> dict[str, str]:
    """Compute :func:`torch_env_from_mpi` and write it into ``os.environ``. Collective.

    Raises ``ValueError`` (on the ranks concerned, after the collective part) when RANK or
    WORLD_SIZE is already set to something else than MPI says: torch rank must equal MPI rank.
    """
    env = torch_env_from_mpi(comm)
    for key in ("RANK", "WORLD_SIZE"):
        old = os.environ.get(key)
        if old is not None and old != env[key]:
            raise ValueError(
                f"{key}={old} is set but MPI says {env[key]}: mpicomm needs torch rank == MPI rank"
            )
    os.environ.update(env)
    return env


def main(argv: list[str] | None = None) -> int:
    """``python -m mpicomm.vllm.launch [-m module | script] args...``: export, then run."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    export_torch_env()
    os.environ.setdefault("MPICOMM_VLLM", "1")
    if args[0] == "-m":
        if len(args) < 2:
            print("usage: python -m mpicomm.vllm.launch -m module [args...]", file=sys.stderr)
            return 2
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
