"""Launch helpers: rank/device mapping, torch launcher variables, abort on uncaught exceptions.

These work the same under ``mpiexec``/``mpirun``, ``srun`` and plain ``python`` (one rank).

* :func:`env_ranks` reads what the launcher put in the environment (no MPI call): Open MPI
  (``OMPI_COMM_WORLD_*``), MPICH/Intel MPI hydra and PMI (``PMI_RANK``, ``PMI_SIZE``,
  ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``), Slurm (``SLURM_PROCID``, ``SLURM_LOCALID``, ...).
  Use it before MPI is initialised, e.g. to choose a GPU.
* :func:`launch_info` is the truth: rank and size from the communicator, local rank and size from
  the node-local communicator (``Split_type(COMM_TYPE_SHARED)``), with the environment as a
  cross-check (a disagreement is reported as a :class:`LaunchWarning`).
* :func:`export_torch_env` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
  ``GROUP_RANK``/``NODE_RANK`` and, when absent, ``MASTER_ADDR``/``MASTER_PORT`` (chosen on rank 0
  and broadcast) for libraries that follow torch's launcher conventions.
* :func:`install_abort_on_exception` (from :mod:`mpicomm.aborts`, where the abort hooks live):
  an uncaught exception on any rank ends the whole job.

Communicators never destroyed are tracked in :mod:`mpicomm.tracking`; ``MPICOMM_LOG_LEVEL`` is
applied by :mod:`mpicomm.logs`.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from .aborts import install_abort_on_exception, uninstall_abort_on_exception

__all__ = [
    "EnvRanks",
    "LaunchInfo",
    "LaunchWarning",
    "env_ranks",
    "export_torch_env",
    "install_abort_on_exception",
    "launch_info",
    "uninstall_abort_on_exception",
]


class LaunchWarning(UserWarning):
    """The launcher's environment disagrees with what MPI reports."""


@dataclass(frozen=True)
class EnvRanks:
    """What the launcher's environment variables say about this process.

    ``source`` names the variables used: ``"openmpi"``, ``"hydra"`` (MPICH/Intel MPI mpiexec),
    ``"pmi"`` (a PMI launcher without local-rank variables), ``"slurm"`` (srun) or ``"none"``
    (plain ``python``: rank 0 of 1). Fields the source does not provide are ``None``.
    """

    source: str
    rank: int | None
    world_size: int | None
    local_rank: int | None
    local_world_size: int | None


@dataclass(frozen=True)
class LaunchInfo:
    """This process's place in the job, from MPI.

    ``rank``/``world_size``: in the communicator passed to :func:`launch_info` (default
    ``COMM_WORLD``). ``local_rank``/``local_world_size``: among the ranks sharing this node.
    ``node_rank``/``num_nodes``: nodes numbered by the lowest rank on each. ``env``: what the
    environment said (:func:`env_ranks`).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    hostname: str
    env: EnvRanks


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def env_ranks(env: Mapping[str, str] | None = None) -> EnvRanks:
    """Read the rank layout from the launcher's environment variables; no MPI call.

    The most specific launcher wins: Open MPI, then hydra (which sets ``MPI_LOCALRANKID``), then
    Slurm when its step has exactly ``PMI_SIZE`` tasks (under ``mpiexec`` inside an allocation the
    ``SLURM_*`` variables describe hydra's proxies, one per node, not the ranks), then bare PMI.
    """
    env = os.environ if env is None else env
    if _int(env, "OMPI_COMM_WORLD_RANK") is not None:
        return EnvRanks(
            "openmpi",
            _int(env, "OMPI_COMM_WORLD_RANK"),
            _int(env, "OMPI_COMM_WORLD_SIZE"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        )
    pmi_rank, pmi_size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
    if _int(env, "MPI_LOCALRANKID") is not None:
        return EnvRanks(
            "hydra",
            pmi_rank,
            pmi_size,
            _int(env, "MPI_LOCALRANKID"),
            _int(env, "MPI_LOCALNRANKS"),
        )
    slurm_rank = _int(env, "SLURM_PROCID")
    step_tasks = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
    in_step = _int(env, "SLURM_STEP_ID") is not None or "SLURM_STEPID" in env
    if slurm_rank is not None and in_step and (pmi_size is None or pmi_size == step_tasks):
        return EnvRanks(
            "slurm",
            slurm_rank,
            step_tasks,
            _int(env, "SLURM_LOCALID"),
            _local_tasks(env),
        )
    if pmi_rank is not None:
        return EnvRanks("pmi", pmi_rank, pmi_size, None, None)
    return EnvRanks("none", 0, 1, 0, 1)


def _local_tasks(env: Mapping[str, str]) -> int | None:
    """Tasks of this Slurm step on this node, from SLURM_STEP_TASKS_PER_NODE (e.g. '2(x3),1')."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = _int(env, "SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    try:
        for part in spec.split(","):
            count, _, rep = part.partition("(x")
            counts.extend([int(count)] * (int(rep.rstrip(")")) if rep else 1))
    except ValueError:
        return None
    return counts[node] if node < len(counts) else None


def launch_info(comm=None, *, check_env: bool = True) -> LaunchInfo:
    """Rank, local rank and node layout of this process, from MPI. Collective over ``comm``.

    ``comm`` defaults to ``MPI.COMM_WORLD``. With ``check_env`` (and ``comm`` the world), a launcher
    variable that disagrees with MPI raises a :class:`LaunchWarning` (a warning, not an error).
    """
    from mpi4py import MPI

    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {type(comm).__name__}")
    from .topology import node_topology

    topo = node_topology(comm)
    info = LaunchInfo(
        comm.Get_rank(),
        comm.Get_size(),
        topo.local_rank,
        topo.local_size,
        topo.node_index,
        topo.num_nodes,
        socket.gethostname(),
        env_ranks(),
    )
    if check_env and comm == MPI.COMM_WORLD:
        _cross_check(info)
    return info


def _cross_check(info: LaunchInfo) -> None:
    env = info.env
    pairs = [
        ("rank", env.rank, info.rank),
        ("world size", env.world_size, info.world_size),
        ("local rank", env.local_rank, info.local_rank),
        ("local world size", env.local_world_size, info.local_world_size),
    ]
    bad = [f"{name} {e} (env) != {m} (MPI)" for name, e, m in pairs if e is not None and e != m]
    if bad:
        warnings.warn(
            f"mpicomm: launcher variables ({env.source}) disagree with MPI on rank {info.rank}: "
            + "; ".join(bad)
            + ". Using MPI's values. Is this python's mpi4py built for the MPI that launched it?",
            LaunchWarning,
            stacklevel=3,
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _master_addr(info: LaunchInfo) -> str:
    if info.num_nodes == 1:
        return "127.0.0.1"
    try:
        return socket.gethostbyname(info.hostname)
    except OSError:
        return info.hostname


def export_torch_env(comm=None, *, env: dict | None = None) -> dict[str, str]:
    """Set torch launcher variables from MPI; return the values set. Collective over ``comm``.

    Always sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` and
    ``NODE_RANK`` (the node index) from :func:`launch_info` (a stale value already there is
    replaced, with a :class:`LaunchWarning`). ``MASTER_ADDR``/``MASTER_PORT`` are kept when rank 0
    has them; otherwise rank 0 picks ``127.0.0.1`` (one node) or its own address, and a free port.
    Rank 0's choice is broadcast, so every rank gets the same pair. ``env`` defaults to
    ``os.environ``.
    """
    from mpi4py import MPI

    if comm is None:
        comm = MPI.COMM_WORLD
    target = os.environ if env is None else env
    info = launch_info(comm)
    values = {
        "RANK": info.rank,
        "WORLD_SIZE": info.world_size,
        "LOCAL_RANK": info.local_rank,
        "LOCAL_WORLD_SIZE": info.local_world_size,
        "GROUP_RANK": info.node_rank,
        "NODE_RANK": info.node_rank,
    }
    master = None
    if info.rank == 0:
        master = (
            target.get("MASTER_ADDR") or _master_addr(info),
            target.get("MASTER_PORT") or str(_free_port()),
        )
    master = comm.bcast(master, root=0)
    out = {k: str(v) for k, v in values.items()}
    stale = [f"{k}={target[k]}" for k, v in out.items() if k in target and target[k] != v]
    if stale:
        warnings.warn(
            f"mpicomm: replacing stale launcher variables on rank {info.rank}: {', '.join(stale)}",
            LaunchWarning,
            stacklevel=2,
        )
    out["MASTER_ADDR"], out["MASTER_PORT"] = master
    target.update(out)
    return out
