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


_BARRIER_KEY = "store_based_barrier_key:"  # torch's key for its store-based barrier


class _WorldStore(dist.Store):
    """The store of ``mpi://``: process-local (the mpicomm backend exchanges nothing through a
    store), except torch's store-based barrier (``TORCH_DIST_INIT_BARRIER=1``), which counts
    the ranks that have arrived: there an MPI barrier on ``COMM_WORLD`` (bounded by the store's
    timeout) stands for the count, and the count then reads as the world size. Groups made with
    ``use_local_synchronization=True`` are not supported by it (their members alone arrive)."""

    def __init__(self, world) -> None:
        super().__init__()
        self._local = dist.HashStore()
        self._world = world
        self._timeout: float | None = None

    def add(self, key: str, value: int) -> int:
        if _BARRIER_KEY in key and value == 1:
            from ..calls import poll, timed_out

            if not poll(self._world.Ibarrier().Test, self._timeout):
                raise timed_out("the barrier after init_process_group", "world", self._timeout)
            return self._local.add(key, self._world.Get_size())
        return self._local.add(key, value)

    def set_timeout(self, timeout) -> None:
        self._timeout = timeout.total_seconds() if timeout else None
        self._local.set_timeout(timeout)

    def set(self, key, value):
        return self._local.set(key, value)

    def get(self, key):
        return self._local.get(key)

    def wait(self, keys, timeout=None):
        return self._local.wait(keys) if timeout is None else self._local.wait(keys, timeout)

    def check(self, keys):
        return self._local.check(keys)

    def compare_set(self, key, expected, desired):
        return self._local.compare_set(key, expected, desired)

    def delete_key(self, key):
        return self._local.delete_key(key)

    def num_keys(self):
        return self._local.num_keys()


_stores: list[_WorldStore] = []


def _mpi_rendezvous(url: str, timeout=None, **kwargs):
    """``mpi://``: rank and size from ``MPI.COMM_WORLD``; the store is :class:`_WorldStore`."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    store = _WorldStore(world)
    _stores.append(store)  # torch's C++ store wrappers do not keep the Python object alive
    yield store, world.Get_rank(), world.Get_size()


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
