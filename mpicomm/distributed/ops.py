"""torch.distributed reduce operations on the group's :class:`mpicomm.MPICommunicator`.

``SUM`` (and ``AVG``, a sum divided by the group size) is the communicator's sum: mpicomm's
numerics (16-bit floats accumulated in float32 in rank order, rounded once, identical bits on every
rank; docs/contract.md, "Sums"). ``PRODUCT``, ``MIN``, ``MAX``, ``BAND``, ``BOR`` and ``BXOR`` have
no sum of their own in the communicator: this module is their one path. The communicator moves every
rank's operand to the ranks that need it (an all-gather, a gather to the root, or an all-to-all of
the pieces for a reduce-scatter), and each of those ranks reduces the W rows in rank order with
torch's elementwise operation: identical bits on every rank, 16-bit and 8-bit floats widened to
float32 and rounded back once, bool with the logical operations. ``PREMUL_SUM`` and anything else
raise ``ValueError`` naming the operation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..dtypes import dtype_info

SUM, AVG = "SUM", "AVG"
NAMES = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR")
BITWISE = ("BAND", "BOR", "BXOR")

_TORCH_OPS = {
    "PRODUCT": torch.mul,
    "MIN": torch.minimum,
    "MAX": torch.maximum,
    "BAND": torch.bitwise_and,
    "BOR": torch.bitwise_or,
    "BXOR": torch.bitwise_xor,
}
# bool has logical operations only; torch's bool results are the logical ones.
_BOOL_OPS = {
    "PRODUCT": torch.logical_and,
    "MIN": torch.logical_and,
    "BAND": torch.logical_and,
    "MAX": torch.logical_or,
    "BOR": torch.logical_or,
    "BXOR": torch.logical_xor,
}


_OPS = tuple((getattr(dist.ReduceOp, name), name) for name in NAMES)


def op_name(reduce_op, operation: str) -> str:
    """The name (``"SUM"``, ...) of a ``dist.ReduceOp``; ``ValueError`` naming an unsupported one."""
    for op, name in _OPS:
        if reduce_op == op:
            return name
    raise ValueError(
        f"{operation}: reduce op {reduce_op} is not supported by the mpicomm backend "
        f"(supported: {', '.join(NAMES)})"
    )


# (name, dtype) pairs :func:`check` has passed: the per-call check is one set lookup.
_CHECKED: set[tuple[str, torch.dtype]] = set()


def check(name: str, dtype: torch.dtype, operation: str) -> None:
    """Refuse, before any MPI call, an operation the dtype has no meaning for."""
    if (name, dtype) in _CHECKED:
        return
    dtype_info(dtype, "tensor")
    if name in BITWISE and (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"{operation}: ReduceOp.{name} needs an integer or bool tensor, got {dtype}"
        )
    if dtype.is_complex and name not in (SUM, AVG):
        raise TypeError(f"{operation}: ReduceOp.{name} is not defined for complex tensors")
    if dtype == torch.bool and name == AVG:
        raise TypeError(f"{operation}: ReduceOp.AVG is not defined for bool tensors")
    _CHECKED.add((name, dtype))


def average(summed: torch.Tensor, world_size: int) -> torch.Tensor:
    """``AVG`` from ``SUM`` in place: floats divided by W (rounded once more), integers truncated."""
    if summed.dtype.is_floating_point or summed.dtype.is_complex:
        return summed.div_(world_size)
    return summed.div_(world_size, rounding_mode="trunc")


def reduce_rows(rows: torch.Tensor, name: str) -> torch.Tensor:
    """``rows`` (W x n, row r from group rank r) reduced with ``name`` in rank order: a fresh
    tensor of n elements of ``rows``' dtype."""
    dtype = rows.dtype
    fn = _BOOL_OPS[name] if dtype == torch.bool else _TORCH_OPS[name]
    wide = rows.float() if dtype.is_floating_point and dtype_info(dtype).narrow_float else rows
    acc = wide[0].clone()
    for row in wide[1:]:
        acc = fn(acc, row)
    return acc.to(dtype)


def all_reduce(communicator, tensor: torch.Tensor, name: str) -> torch.Tensor:
    """The ``name`` reduction of every rank's ``tensor``, on every rank (flat, fresh)."""
    rows = communicator.all_gather(tensor.reshape(1, -1), dim=0)
    return reduce_rows(rows, name)


def reduce(communicator, tensor: torch.Tensor, name: str, root: int) -> torch.Tensor | None:
    """The ``name`` reduction of every rank's ``tensor`` on ``root`` (flat, fresh); ``None``
    elsewhere."""
    rows = communicator.gather(tensor.reshape(1, -1), dst=root, dim=0)
    return None if rows is None else reduce_rows(rows, name)


def reduce_scatter(communicator, flat: torch.Tensor, name: str) -> torch.Tensor:
    """This rank's W-th of the ``name`` reduction of every rank's ``flat`` (W equal pieces):
    each rank receives its piece from every rank (an all-to-all) and reduces them."""
    world = communicator.world_size
    piece = flat.numel() // world
    pieces = communicator.all_to_allv(flat.reshape(-1), [piece] * world, [piece] * world)
    return reduce_rows(pieces.reshape(world, piece), name)
