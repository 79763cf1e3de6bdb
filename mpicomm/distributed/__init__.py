"""torch.distributed on MPI: the ``"mpicomm"`` process-group backend (docs/distributed.md).

Importing :mod:`mpicomm` calls :func:`register`, which only tells torch the backend's name and
the ``mpi://`` rendezvous (nothing collective, no MPI call). Then::

    torch.distributed.init_process_group("mpicomm", init_method="mpi://")

takes rank and world size from ``MPI.COMM_WORLD`` (no MASTER_ADDR/MASTER_PORT, no TCP store);
``init_method="env://"`` works as well (with RANK/WORLD_SIZE equal to MPI's). The process group
class lives in :mod:`mpicomm.distributed.backend`, imported when the first group is created.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

NAME = "mpicomm"
SCHEME = "mpi"


def _create(options, backend_options=None):
    from .backend import create

    return create(options, backend_options)


def _mpi_rendezvous(url: str, timeout=None, **kwargs):
    """``mpi://``: rank and size from ``MPI.COMM_WORLD``; a process-local store (the mpicomm
    backend exchanges nothing through a store)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    yield dist.HashStore(), world.Get_rank(), world.Get_size()


def register() -> None:
    """Register the ``"mpicomm"`` backend (CPU and CUDA tensors) and the ``mpi://`` rendezvous
    with torch.distributed; idempotent, no MPI call."""
    if not dist.is_available():
        return
    if NAME not in dist.Backend.backend_list:
        dist.Backend.register_backend(NAME, _create, extended_api=True, devices=["cpu", "cuda"])
    with contextlib.suppress(RuntimeError):  # already registered by an earlier call
        dist.register_rendezvous_handler(SCHEME, _mpi_rendezvous)


register()

__all__ = ["NAME", "SCHEME", "register"]
