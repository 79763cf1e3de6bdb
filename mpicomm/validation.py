"""Argument checks that each rank can make alone, before any MPI call.

Every function raises ``TypeError`` or ``ValueError`` naming the offending argument, so a bad call
fails on every rank alike instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dtypes import DtypeInfo, dtype_info


def check_tensor(value: object, argument: str = "input_") -> DtypeInfo:
    """``value`` must be a tensor of a supported dtype; returns its dtype row."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided:
        raise TypeError(f"{argument} must be a dense (strided) tensor, got layout {value.layout}")
    return dtype_info(value.dtype, argument)


def normalize_dim(dim: object, ndim: int, argument: str = "dim") -> int:
    """``dim`` in ``[-ndim, ndim)`` made non-negative; a 0-d tensor counts as one dimension."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{argument} must be an int, got {type(dim).__name__}")
    span = max(ndim, 1)
    if not -span <= dim < span:
        raise ValueError(f"{argument}={dim} is out of range for a tensor with {ndim} dimensions")
    return dim % span


def check_rank(value: object, world_size: int, argument: str) -> int:
    """``value`` must be a rank of the group: an int in ``[0, world_size)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int rank, got {type(value).__name__}")
    if not 0 <= value < world_size:
        raise ValueError(f"{argument}={value} is not a rank of a group of size {world_size}")
    return value


def check_sizes(
    sizes: object, world_size: int, argument: str = "sizes", total: int | None = None
) -> list[int]:
    """``sizes`` must be ``world_size`` non-negative ints, adding up to ``total`` when given."""
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    if not isinstance(sizes, Sequence) or isinstance(sizes, str | bytes):
        raise TypeError(f"{argument} must be a sequence of ints, got {type(sizes).__name__}")
    out = []
    for i, s in enumerate(sizes):
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"{argument}[{i}] must be an int, got {type(s).__name__}")
        if s < 0:
            raise ValueError(f"{argument}[{i}]={s} is negative")
        out.append(s)
    if len(out) != world_size:
        raise ValueError(f"{argument} has {len(out)} entries, the group has {world_size} ranks")
    if total is not None and sum(out) != total:
        raise ValueError(f"{argument} adds up to {sum(out)}, the tensor has {total} along dim")
    return out


def even_sizes(total: int, world_size: int, argument: str = "input_") -> list[int]:
    """An even split of ``total`` rows over the group; ``ValueError`` if it does not divide."""
    if total % world_size:
        raise ValueError(
            f"{argument} has {total} elements along dim, not divisible by the group size "
            f"{world_size}"
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
