"""vLLM's process groups on the ``"mpicomm"`` torch.distributed backend: no gloo group at all.

vLLM builds each ``GroupCoordinator`` with ``device_group = new_group(ranks, backend=<backend>)``
and ``cpu_group = new_group(ranks, backend="gloo")``. When the default group is an mpicomm group
(``init_distributed_environment(..., backend="mpicomm")``, which the mpicomm platform makes its
``dist_backend``), torch hands every ``new_group`` call, whatever backend it names, to the default
group's own ``new_group`` (``torch.distributed.distributed_c10d``: a Python process group that
implements ``new_group`` is delegated to). Both groups of every coordinator are then MPI
sub-communicators (:class:`mpicomm.distributed.backend.MPIProcessGroup`): object broadcasts,
barriers and metadata travel over MPI, and no TCP rendezvous is needed beyond the default
group's own (``env://`` under ``external_launcher``; ``mpi://`` needs none).

:func:`gloo_groups` lists any gloo group that exists anyway; :func:`check_no_gloo` raises if one
does (the vLLM tests call it after building the groups).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed import NAME as DIST_BACKEND

__all__ = ["DIST_BACKEND", "check_no_gloo", "gloo_groups", "on_mpi"]


def on_mpi(group) -> bool:
    """Whether ``group`` is an mpicomm (MPI) process group."""
    from ..distributed.backend import MPIProcessGroup

    return isinstance(group, MPIProcessGroup)


def _is_gloo(group) -> bool:
    if on_mpi(group):
        return False
    try:
        backend = group._get_backend(torch.device("cpu"))
    except (RuntimeError, AttributeError):
        return False
    return type(backend).__name__ == "ProcessGroupGloo"


def gloo_groups() -> list:
    """Every process group torch knows of (this rank's) that runs on gloo."""
    if not dist.is_initialized():
        return []
    return [pg for pg in dist.distributed_c10d._world.pg_map if _is_gloo(pg)]


def check_no_gloo() -> None:
    """Raise ``RuntimeError`` naming the gloo groups, if any exist."""
    found = gloo_groups()
    if found:
        names = ", ".join(str(dist.distributed_c10d._world.pg_names.get(pg, pg)) for pg in found)
        raise RuntimeError(f"gloo process groups exist beside the mpicomm backend: {names}")
