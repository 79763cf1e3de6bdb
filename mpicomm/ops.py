"""mpicomm collectives as torch custom operators, so ``torch.compile(fullgraph=True)`` traces them.

Dynamo cannot trace mpi4py calls. These operators (namespace ``torch.ops.mpicomm``) are opaque
nodes in the graph with fake (meta) implementations that give the output shape and dtype, and
run the real collective at execution time. A communicator is named by a string (Dynamo passes
strings, not Python objects, to custom operators): register it first.

    name = mpicomm.ops.register_communicator(comm)           # default name: comm.unique_name
    y = torch.ops.mpicomm.all_reduce(x, name)
    y = mpicomm.ops.all_reduce(x, name)                      # the same, as a Python function

Operators (``W`` = group size, ``r`` = this rank in the group; every output is a fresh tensor of
the input's dtype):

- ``all_reduce(Tensor x, str group_name) -> Tensor``: sum over ranks, shape of ``x``.
- ``all_gather(Tensor x, int dim, int world_size, str group_name) -> Tensor``:
  ``x.shape[dim] * W`` along ``dim``.
- ``reduce_scatter(Tensor x, int dim, int world_size, str group_name) -> Tensor``:
  ``x.shape[dim] // W`` along ``dim``.
- ``all_gatherv(Tensor x, int[] sizes, str group_name) -> Tensor``: ``sum(sizes)`` rows (dim 0).
- ``reduce_scatterv(Tensor x, int dim, int[] sizes, int rank, str group_name) -> Tensor``:
  ``sizes[rank]`` along ``dim`` (``rank`` is this rank in the group; it fixes the shape).
- ``broadcast(Tensor x, int src, str group_name) -> Tensor``: shape of ``x``.

``world_size`` and ``rank`` are explicit arguments so the fake implementations need no lookup;
the real implementations check them against the communicator.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_REGISTRY: dict[str, Any] = {}
_LOCK = threading.Lock()


def register_communicator(comm: Any, name: str | None = None, *, replace: bool = False) -> str:
    """Make ``comm`` reachable from the operators as ``name``; return the name.

    ``name`` defaults to ``comm.unique_name`` (or ``"mpicomm:<id>"`` when that is empty).
    Registering a different communicator under a taken name raises ``ValueError`` unless
    ``replace=True``. Local to this process; no MPI call.
    """
    if name is None:
        name = getattr(comm, "unique_name", "") or f"mpicomm:{id(comm):x}"
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    with _LOCK:
        old = _REGISTRY.get(name)
        if old is not None and old is not comm and not replace:
            raise ValueError(f"a different communicator is already registered as {name!r}")
        _REGISTRY[name] = comm
    return name


def unregister_communicator(name: str, comm: Any = None) -> None:
    """Forget ``name`` (only if it still maps to ``comm``, when ``comm`` is given)."""
    with _LOCK:
        if comm is None or _REGISTRY.get(name) is comm:
            _REGISTRY.pop(name, None)


def get_communicator(name: str) -> Any:
    """The communicator registered as ``name``; ``KeyError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"no mpicomm communicator registered as {name!r} (known: {sorted(_REGISTRY)})"
        ) from None


def _fresh(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Custom operators may not return (a view of) their input: copy in that case."""
    if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and x.numel():
        return out.clone()
    return out


def _norm_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < max(ndim, 1):
        raise ValueError(f"dim {dim} out of range for a {ndim}-d tensor")
    return dim % ndim if ndim else 0


def _check_world(comm: Any, world_size: int, name: str) -> None:
    if comm.world_size != world_size:
        raise ValueError(f"world_size={world_size} but group {name!r} has {comm.world_size} ranks")


def _check_sizes(comm: Any, sizes: list[int], name: str) -> None:
    if len(sizes) != comm.world_size:
        raise ValueError(
            f"sizes has {len(sizes)} entries, but group {name!r} has {comm.world_size} ranks"
        )


def _resized(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[_norm_dim(dim, x.dim())] = length
    return x.new_empty(shape)


# -- all_reduce -------------------------------------------------------------------------------
@torch.library.custom_op("mpicomm::all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _fresh(get_communicator(group_name).all_reduce(x), x)


@_all_reduce.register_fake
def _(x, group_name):
    return x.new_empty(x.shape)


# -- all_gather -------------------------------------------------------------------------------
@torch.library.custom_op("mpicomm::all_gather", mutates_args=())
def _all_gather(x: torch.Tensor, dim: int, world_size: int, group_name: str) -> torch.Tensor:
    comm = get_communicator(group_name)
    _check_world(comm, world_size, group_name)
    return _fresh(comm.all_gather(x, dim), x)


@_all_gather.register_fake
def _(x, dim, world_size, group_name):
    if x.dim() == 0:  # eager gathers a 0-d tensor as shape (1,): (W,)
        _norm_dim(dim, 0)
        return x.new_empty((world_size,))
    return _resized(x, dim, x.shape[_norm_dim(dim, x.dim())] * world_size)


# -- reduce_scatter ---------------------------------------------------------------------------
@torch.library.custom_op("mpicomm::reduce_scatter", mutates_args=())
def _reduce_scatter(x: torch.Tensor, dim: int, world_size: int, group_name: str) -> torch.Tensor:
    comm = get_communicator(group_name)
    _check_world(comm, world_size, group_name)
    return _fresh(comm.reduce_scatter(x, dim), x)


@_reduce_scatter.register_fake
def _(x, dim, world_size, group_name):
    return _resized(x, dim, x.shape[_norm_dim(dim, x.dim())] // world_size)


# -- all_gatherv ------------------------------------------------------------------------------
@torch.library.custom_op("mpicomm::all_gatherv", mutates_args=())
def _all_gatherv(x: torch.Tensor, sizes: list[int], group_name: str) -> torch.Tensor:
    comm = get_communicator(group_name)
    _check_sizes(comm, sizes, group_name)
    return _fresh(comm.all_gatherv(x, 0, list(sizes)), x)


@_all_gatherv.register_fake
def _(x, sizes, group_name):
    return _resized(x, 0, sum(sizes))


# -- reduce_scatterv --------------------------------------------------------------------------
@torch.library.custom_op("mpicomm::reduce_scatterv", mutates_args=())
def _reduce_scatterv(
    x: torch.Tensor, dim: int, sizes: list[int], rank: int, group_name: str
) -> torch.Tensor:
    comm = get_communicator(group_name)
    _check_sizes(comm, sizes, group_name)
    if comm.rank_in_group != rank:
        raise ValueError(f"rank={rank} but this is rank {comm.rank_in_group} of {group_name!r}")
    return _fresh(comm.reduce_scatterv(x, dim, list(sizes)), x)


@_reduce_scatterv.register_fake
def _(x, dim, sizes, rank, group_name):
    return _resized(x, dim, sizes[rank])


# -- broadcast --------------------------------------------------------------------------------
@torch.library.custom_op("mpicomm::broadcast", mutates_args=())
def _broadcast(x: torch.Tensor, src: int, group_name: str) -> torch.Tensor:
    return _fresh(get_communicator(group_name).broadcast(x, src), x)


@_broadcast.register_fake
def _(x, src, group_name):
    return x.new_empty(x.shape)


# -- Python conveniences (traceable: they only call the operators) ------------------------------
def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``torch.ops.mpicomm.all_reduce``: sum over the group named ``group_name``."""
    return torch.ops.mpicomm.all_reduce(x, group_name)


def all_gather(
    x: torch.Tensor, group_name: str, dim: int = -1, world_size: int = -1
) -> torch.Tensor:
    """Concatenation along ``dim``; ``world_size`` defaults to the registered group's size."""
    if world_size < 0:
        world_size = get_communicator(group_name).world_size
    return torch.ops.mpicomm.all_gather(x, dim, world_size, group_name)


def reduce_scatter(
    x: torch.Tensor, group_name: str, dim: int = -1, world_size: int = -1
) -> torch.Tensor:
    """This rank's chunk of the sum along ``dim``."""
    if world_size < 0:
        world_size = get_communicator(group_name).world_size
    return torch.ops.mpicomm.reduce_scatter(x, dim, world_size, group_name)


def all_gatherv(x: torch.Tensor, sizes: list[int], group_name: str) -> torch.Tensor:
    """Rows of every rank (``sizes[i]`` from rank i) along dim 0."""
    return torch.ops.mpicomm.all_gatherv(x, list(sizes), group_name)


def reduce_scatterv(
    x: torch.Tensor, sizes: list[int], group_name: str, dim: int = -1, rank: int = -1
) -> torch.Tensor:
    """This rank's ``sizes[rank]`` slice of the sum along ``dim``."""
    if rank < 0:
        rank = get_communicator(group_name).rank_in_group
    return torch.ops.mpicomm.reduce_scatterv(x, dim, list(sizes), rank, group_name)


def broadcast(x: torch.Tensor, group_name: str, src: int = 0) -> torch.Tensor:
    """Group rank ``src``'s tensor on every rank."""
    return torch.ops.mpicomm.broadcast(x, src, group_name)
