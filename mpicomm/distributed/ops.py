"""torch.distributed reduce operations, mapped to mpicomm's sum or to MPI's own operations.

``SUM`` (and ``AVG``, a sum divided by the group size) goes through
:meth:`mpicomm.MPICommunicator.all_reduce` / ``reduce_scatter``: mpicomm's numerics (16-bit floats
accumulated in float32 in rank order, rounded once, identical bits on every rank; docs/contract.md,
"Sums"). ``PRODUCT``, ``MIN``, ``MAX``, ``BAND``, ``BOR`` and ``BXOR`` are MPI's operations on the
tensor's own type; 16-bit and 8-bit floats (no MPI type) are widened to float32 and rounded back
once. ``PREMUL_SUM`` and anything else raise ``ValueError`` naming the operation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._mpi import MPI
from ..buffers import mpi_spec
from ..dtypes import dtype_info

SUM, AVG = "SUM", "AVG"
NAMES = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR")
BITWISE = ("BAND", "BOR", "BXOR")

# MPI op names (looked up on the lazy MPI module when used). bool has logical operations only;
# torch's bool results are the logical ones.
_MPI_OPS = {
    "PRODUCT": "PROD",
    "MIN": "MIN",
    "MAX": "MAX",
    "BAND": "BAND",
    "BOR": "BOR",
    "BXOR": "BXOR",
}
_BOOL_OPS = {
    "PRODUCT": "LAND",
    "MIN": "LAND",
    "BAND": "LAND",
    "MAX": "LOR",
    "BOR": "LOR",
    "BXOR": "LXOR",
}


def op_name(reduce_op, operation: str) -> str:
    """The name (``"SUM"``, ...) of a ``dist.ReduceOp``; ``ValueError`` naming an unsupported one."""
    for name in NAMES:
        if reduce_op == getattr(dist.ReduceOp, name):
            return name
    raise ValueError(
        f"{operation}: reduce op {reduce_op} is not supported by the mpicomm backend "
        f"(supported: {', '.join(NAMES)})"
    )


def check(name: str, dtype: torch.dtype, operation: str) -> None:
    """Refuse, before any MPI call, an operation the dtype has no meaning for."""
    dtype_info(dtype, "tensor")
    if name in BITWISE and (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(
            f"{operation}: ReduceOp.{name} needs an integer or bool tensor, got {dtype}"
        )
    if dtype.is_complex and name not in (SUM, AVG):
        raise TypeError(f"{operation}: ReduceOp.{name} is not defined for complex tensors")
    if dtype == torch.bool and name == AVG:
        raise TypeError(f"{operation}: ReduceOp.AVG is not defined for bool tensors")


def average(summed: torch.Tensor, world_size: int) -> torch.Tensor:
    """``AVG`` from ``SUM``: floats divided by W (rounded once more), integers truncated."""
    if summed.dtype.is_floating_point or summed.dtype.is_complex:
        return summed.div_(world_size)
    return summed.div_(world_size, rounding_mode="trunc")


def operand(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous host tensor in a type MPI can reduce: 16/8-bit floats as float32."""
    host = tensor.detach().to("cpu")
    if host.dtype.is_floating_point and dtype_info(host.dtype).narrow_float:
        host = host.float()
    return host.contiguous()


def mpi_op(name: str, dtype: torch.dtype) -> MPI.Op:
    return getattr(MPI, (_BOOL_OPS if dtype == torch.bool else _MPI_OPS)[name])


def reduce(caller, operation: str, comm, tensor: torch.Tensor, name: str, root: int | None):
    """MPI's ``name`` over the group of ``tensor``: a fresh host tensor (of the operand's type) on
    every rank (``root=None``) or on ``root`` only (``None`` elsewhere)."""
    x = operand(tensor)
    out = torch.empty_like(x)
    op = mpi_op(name, x.dtype)
    if root is None:
        caller(operation, comm, "Allreduce", mpi_spec(x), mpi_spec(out), op)
        return out
    mine = comm.Get_rank() == root
    caller(operation, comm, "Reduce", mpi_spec(x), mpi_spec(out) if mine else None, op, root)
    return out if mine else None


def reduce_scatter(caller, operation: str, comm, stacked: torch.Tensor, name: str):
    """MPI's ``name`` over the group of the flat ``stacked`` (W equal pieces); this rank's piece."""
    x = operand(stacked)
    out = torch.empty(x.numel() // comm.Get_size(), dtype=x.dtype)
    op = mpi_op(name, x.dtype)
    caller(operation, comm, "Reduce_scatter_block", mpi_spec(x), mpi_spec(out), op)
    return out
