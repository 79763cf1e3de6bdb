"""Argument checks that each rank can make alone, before any MPI call.

Every function raises ``TypeError`` or ``ValueError`` naming the offending argument, so a bad call
fails on every rank alike instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from ._mpi import MPI
from .config import parse_flag
from .dtypes import DtypeInfo, dtype_info


def as_int(value: object, argument: str, what: str = "an int") -> int:
    """``value`` as a Python int: an ``int``, a numpy integer or anything with ``__index__``
    (as torch accepts), never a bool."""
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{argument} must be {what}, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{argument} must be {what}, got {type(value).__name__}") from None


def check_comm(value: object, argument: str) -> None:
    """``value`` must be an intracommunicator this rank belongs to (not ``COMM_NULL``, not an
    intercommunicator). Local: no message is exchanged."""
    if not isinstance(value, MPI.Comm):
        raise TypeError(f"{argument} must be an mpi4py MPI.Comm, got {type(value).__name__}")
    if value == MPI.COMM_NULL:
        raise ValueError(
            f"{argument} is MPI.COMM_NULL: this rank is not a member of that group (a Split "
            f"with MPI.UNDEFINED, or a freed communicator)"
        )
    if value.Is_inter():
        raise TypeError(
            f"{argument} is an intercommunicator: mpicomm needs an intracommunicator "
            f"(make one with {argument}.Merge())"
        )


def check_device_type(device: torch.device) -> None:
    """A communicator serves ``cpu`` or an existing CUDA device (checked at construction)."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"device={str(device)!r}: mpicomm serves cpu and cuda devices only")
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but torch sees no CUDA device on this rank")


def check_tensor(value: object, argument: str = "input_") -> DtypeInfo:
    """``value`` must be a dense tensor of a supported dtype; returns its dtype row."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_nested:
        raise TypeError(f"{argument} is a nested tensor: pass its components (.unbind())")
    if value.layout is not torch.strided:
        raise TypeError(f"{argument} must be a dense (strided) tensor, got layout {value.layout}")
    return dtype_info(value.dtype, argument)


def normalize_dim(dim: object, ndim: int, argument: str = "dim") -> int:
    """``dim`` in ``[-ndim, ndim)`` made non-negative; a 0-d tensor counts as one dimension."""
    dim = as_int(dim, argument)
    span = max(ndim, 1)
    if not -span <= dim < span:
        raise ValueError(f"{argument}={dim} is out of range for a tensor with {ndim} dimensions")
    return dim % span


def check_rank(value: object, world_size: int, argument: str) -> int:
    """``value`` must be a rank of the group: an int in ``[0, world_size)``."""
    value = as_int(value, argument, "an int rank")
    if not 0 <= value < world_size:
        raise ValueError(f"{argument}={value} is not a rank of a group of size {world_size}")
    return value


def check_peer(value: object, world_size: int, rank: int, argument: str) -> int:
    """A rank of the group other than this one (``rank``): the peer of a send or receive."""
    value = check_rank(value, world_size, argument)
    if value == rank:
        raise ValueError(
            f"{argument}={value} is this rank: a blocking send or receive to itself cannot "
            f"complete (use the tensor directly)"
        )
    return value


def check_sizes(
    sizes: object,
    world_size: int,
    argument: str = "sizes",
    total: int | None = None,
    whole: str = "the tensor's size along dim",
) -> list[int]:
    """``sizes`` must be ``world_size`` non-negative ints, adding up to ``total`` when given
    (``whole`` names it in the message, e.g. ``input_.shape[0]``)."""
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    if isinstance(sizes, np.ndarray):
        sizes = list(sizes)
    if not isinstance(sizes, Sequence) or isinstance(sizes, str | bytes):
        raise TypeError(f"{argument} must be a sequence of ints, got {type(sizes).__name__}")
    out = []
    for i, s in enumerate(sizes):
        s = as_int(s, f"{argument}[{i}]")
        if s < 0:
            raise ValueError(f"{argument}[{i}]={s} is negative")
        out.append(s)
    if len(out) != world_size:
        raise ValueError(f"{argument} has {len(out)} entries, the group has {world_size} ranks")
    if total is not None and sum(out) != total:
        raise ValueError(
            f"{argument} adds up to {sum(out)}, but {whole} is {total}: they must be equal"
        )
    return out


def even_sizes(total: int, world_size: int, dim: int, argument: str = "input_") -> list[int]:
    """An even split of ``total`` rows (``argument``'s size along ``dim``) over the group;
    ``ValueError`` if it does not divide."""
    if total % world_size:
        raise ValueError(
            f"{argument}.shape[{dim}]={total} is not divisible by the group size {world_size}: "
            f"an even split needs a multiple of {world_size} (reduce_scatterv takes sizes)"
        )
    return [total // world_size] * world_size


def check_device(tensor: torch.Tensor, device: torch.device, argument: str = "input_") -> None:
    """A CUDA tensor must live on the communicator's GPU; CPU tensors are always accepted."""
    if tensor.is_cpu:
        return
    if tensor.is_cuda and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if tensor.device.index != index:
            raise ValueError(
                f"{argument} is on {tensor.device}, but this communicator serves {device}"
            )
        return
    if not tensor.is_cuda:
        raise ValueError(f"{argument} is on {tensor.device}: only CPU and CUDA tensors move")


def check_out(out: object, input_: torch.Tensor, shape=None) -> None:
    """``out`` must be a tensor of ``input_``'s dtype and device and of the result's ``shape``
    (default: ``input_``'s shape); it receives the result."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    shape = input_.shape if shape is None else torch.Size(shape)
    if out.shape != shape or out.dtype != input_.dtype or out.device != input_.device:
        raise ValueError(
            f"out has shape {tuple(out.shape)}, dtype {out.dtype} on {out.device}; the result "
            f"has shape {tuple(shape)}, dtype {input_.dtype} on {input_.device}"
        )
    if out.requires_grad and out.is_leaf:
        raise ValueError("out is a leaf tensor that requires grad: pass out=tensor.detach()")


def check_seconds(value: object, argument: str) -> float | None:
    """A finite number of seconds ``>= 0``; ``0`` means no bound (``None``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value >= 0
        or not math.isfinite(value)
    ):
        raise ValueError(
            f"{argument} must be a finite number of seconds >= 0 (0: no bound), got {value!r}"
        )
    return float(value) or None


def check_flag(value: object, argument: str) -> bool:
    """A yes/no argument: a bool (numpy's too), the ints 0 and 1, or a string spelled as the
    ``MPICOMM_*`` flags are (``"1"``, ``"no"``, ``"off"``, ...; :func:`mpicomm.config.parse_flag`).
    Anything else raises: ``bool("no")`` would be True."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return parse_flag(value, argument)
    raise TypeError(f"{argument} must be a bool (or 0/1), got {value!r}")


def check_choice(value: object, choices: tuple[str, ...], argument: str) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return value


def check_shape(size: object, argument: str = "size") -> tuple[int, ...]:
    """An int or a sequence of non-negative ints, as a shape tuple."""
    if isinstance(size, int | np.integer) and not isinstance(size, bool):
        size = (size,)
    if not isinstance(size, torch.Size | tuple | list):
        raise TypeError(
            f"{argument} must be a torch.Size or a sequence of ints, got {type(size).__name__}"
        )
    shape = []
    for n in size:
        try:
            n = as_int(n, argument)
        except TypeError:
            n = -1
        if n < 0:
            raise ValueError(f"{argument} must hold non-negative ints, got {tuple(size)}")
        shape.append(n)
    return tuple(shape)


def check_row_tensors(
    value: object, dim: object, sizes: object, world_size: int, rank: int
) -> tuple[list[torch.Tensor], list[int]]:
    """The tensors and per-rank row counts of an ``all_gatherv``.

    ``value`` is a tensor or a non-empty list of tensors with the same rows (dim 0, the only
    ``dim`` accepted); ``sizes`` (``None``: equal rows everywhere) must give this rank's rows.
    """
    if isinstance(value, torch.Tensor):
        tensors, names = [value], ["input_"]
    elif isinstance(value, list | tuple) and value:
        tensors, names = list(value), [f"input_[{i}]" for i in range(len(value))]
    else:
        raise TypeError(
            f"input_ must be a tensor or a non-empty list of tensors, got {value!r:.60}"
        )
    for name, t in zip(names, tensors, strict=True):
        check_tensor(t, name)
        if t.dim() == 0:
            raise ValueError("all_gatherv needs tensors with at least one dimension (rows)")
    if normalize_dim(dim, tensors[0].dim()) != 0:
        raise ValueError(f"all_gatherv supports dim=0 only, got dim={dim}")
    rows = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != rows:
            raise ValueError(f"input_[{i}] has {t.shape[0]} rows, input_[0] has {rows}")
    sizes = [rows] * world_size if sizes is None else check_sizes(sizes, world_size)
    if sizes[rank] != rows:
        raise ValueError(f"sizes[{rank}]={sizes[rank]} but this rank has {rows} rows")
    return tensors, sizes
