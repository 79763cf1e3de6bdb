"""The flat sums over a group: MPI's own, or raw bytes through MPI summed by torch.

Which one a call uses is decided in :mod:`mpicomm.plan`.

``native``
    MPI's own ``Allreduce`` / ``Reduce_scatter``.
``bytes``
    (docs/architecture.md, "Sums") an all-to-all of raw bytes gives each rank the W slices of its chunk; torch
    sums them in rank order in the accumulation dtype (float32 for 16-bit and 8-bit floats) and
    rounds once; an all-gather returns the chunks. It moves the bytes of a ring all-reduce, and every
    element is computed by exactly one rank, so all ranks hold identical bits.

All functions take contiguous tensors on the work device (host memory when staging) and write into
``out``; they never modify their input.
"""

from __future__ import annotations

import torch

from ._mpi import MPI
from .buffers import Workspace, mpi_spec, sync_device, vector_spec
from .calls import Caller
from .dtypes import DtypeInfo

# 16-bit floats that torch adds (CPU and CUDA) by widening to float32, adding, rounding once:
# for two ranks its add is the rank-order sum, in one pass instead of four (tests/test_reduction.py
# checks the bits, special values included).
_ADD_IN_FLOAT32 = {torch.bfloat16, torch.float16}

# Below this many gathered bytes (W x message), the bytes algorithm gathers every rank's whole
# input and each rank sums all of it: one MPI call instead of three (measured: docs/architecture.md,
# "Sums").
GATHER_ALL_BELOW = 64 << 10

# Narrow-float sums whose widened (W, n) copy is at most this many bytes widen it in one call
# instead of row by row into the workspace (fewer torch calls; see sum_in_rank_order).
WIDEN_WHOLE_BELOW = 64 << 10


def split_evenly(total: int, parts: int) -> list[int]:
    """``parts`` near-equal counts adding up to ``total``; the first ones get the remainder."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def sum_in_rank_order(
    parts: torch.Tensor, out: torch.Tensor, info: DtypeInfo, workspace: Workspace
) -> None:
    """``out = parts[0] + parts[1] + ...`` left to right, accumulated in ``info.accumulate``.

    ``parts``: (W, n) of the dtype; ``out``: (n,) of the dtype. One rounding at the end. Narrow
    floats are widened whole when small (fewest torch calls), else row by row into a reused
    buffer: a mixed-dtype ``add_`` is about twice as slow (measured, docs/benchmarks.md).
    """
    if info.accumulate is info.dtype:
        rows = parts.unbind(0)  # one call, where indexing costs a call per row
        if len(rows) == 1:
            out.copy_(rows[0])
            return
        torch.add(rows[0], rows[1], out=out)
        for row in rows[2:]:
            out.add_(row)
        return
    if parts.shape[0] == 2 and info.dtype in _ADD_IN_FLOAT32:
        # torch adds two 16-bit floats in float32 and rounds once: the rank-order sum, exactly.
        torch.add(*parts.unbind(0), out=out)
        return
    if parts.numel() * info.accumulate.itemsize <= WIDEN_WHOLE_BELOW:
        wide = parts.to(info.accumulate).unbind(0)
        acc = wide[0]  # a row of the fresh widened copy: adding into it in place is safe
        for row in wide[1:]:
            acc.add_(row)
        out.copy_(acc)
        return
    rows = parts.unbind(0)
    shape = tuple(out.shape)
    acc = workspace.tensor("accumulate", shape, info.accumulate, out.device)
    acc.copy_(rows[0])
    if len(rows) > 1:
        wide = workspace.tensor("widen", shape, info.accumulate, out.device)
        for row in rows[1:]:
            wide.copy_(row)
            acc.add_(wide)
    out.copy_(acc)


def reduce_scatter_bytes(
    call: Caller,
    operation: str,
    comm: MPI.Comm,
    x: torch.Tensor,
    counts: list[int],
    out: torch.Tensor,
    info: DtypeInfo,
    workspace: Workspace,
) -> None:
    """Rank r gets the sum of elements ``[sum(counts[:r]), +counts[r])`` of every rank's ``x``.

    ``x``: contiguous, ``sum(counts)`` elements; ``out``: ``counts[r]`` elements.
    """
    world, rank = comm.Get_size(), comm.Get_rank()
    mine = counts[rank]
    parts = workspace.tensor("parts", (world, mine), x.dtype, x.device)
    if counts.count(mine) == world:
        call(operation, comm, "Alltoall", mpi_spec(x, mine), mpi_spec(parts, mine))
    else:
        call(
            operation,
            comm,
            "Alltoallv",
            vector_spec(x, counts),
            vector_spec(parts, [mine] * world),
        )
    sum_in_rank_order(parts, out.view(-1), info, workspace)


def all_reduce_bytes(
    call: Caller,
    operation: str,
    comm: MPI.Comm,
    x: torch.Tensor,
    out: torch.Tensor,
    info: DtypeInfo,
    workspace: Workspace,
) -> None:
    """``out`` = elementwise sum of every rank's ``x`` by the bytes algorithm (same shapes).

    The first ``W * (n // W)`` elements travel in equal chunks (MPI's Alltoall and Allgather are
    much faster than their v-variants here); the last ``n mod W`` elements are gathered from every
    rank and summed by each rank itself, in rank order, so they too have identical bits everywhere.
    Small inputs (``W * nbytes <= GATHER_ALL_BELOW``) are all "tail": one Allgather and a local sum.
    """
    world = comm.Get_size()
    flat_x, flat_out = x.reshape(-1), out.view(-1)
    if x.nbytes * world <= GATHER_ALL_BELOW:
        # One Allgather beats three calls for small sums, and needs no slicing.
        _gather_and_sum(call, operation, comm, flat_x, flat_out, info, workspace)
        return
    rank = comm.Get_rank()
    chunk, tail = divmod(flat_x.numel(), world)
    body = chunk * world
    if chunk:
        mine = flat_out[rank * chunk : (rank + 1) * chunk]
        reduce_scatter_bytes(
            call, operation, comm, flat_x[:body], [chunk] * world, mine, info, workspace
        )
        sync_device(out.device)  # the sum ran as queued kernels; MPI must read the finished chunk
        call(operation, comm, "Allgather", MPI.IN_PLACE, mpi_spec(flat_out[:body], chunk))
    if tail:
        _gather_and_sum(call, operation, comm, flat_x[body:], flat_out[body:], info, workspace)


def _gather_and_sum(call, operation, comm, src, dst, info, workspace) -> None:
    """``dst`` = the rank-order sum of every rank's 1-d ``src``: gathered whole, summed locally
    (so every rank computes the same bits)."""
    parts = workspace.tensor("tails", (comm.Get_size(), src.numel()), src.dtype, src.device)
    call(operation, comm, "Allgather", mpi_spec(src), mpi_spec(parts))
    sum_in_rank_order(parts, dst, info, workspace)


def bytes_workspace(numel: int, info: DtypeInfo, world: int) -> dict[str, int]:
    """Bytes per workspace slot that :func:`all_reduce_bytes` (or a reduce-scatter of an even
    split) of ``numel`` elements takes, for reserving them ahead of the first call."""
    size, wide = info.itemsize, info.accumulate.itemsize
    chunk = -(-numel // world)  # the largest chunk of an even split (reduce-scatter)
    tail = numel if numel * size * world <= GATHER_ALL_BELOW else numel % world
    widest = max(chunk, tail)
    need = {"parts": world * chunk * size, "tails": world * tail * size}
    if info.accumulate is not info.dtype:
        need["accumulate"] = need["widen"] = widest * wide
    return need


def all_reduce_native(
    call: Caller,
    operation: str,
    comm: MPI.Comm,
    x: torch.Tensor,
    out: torch.Tensor,
    info: DtypeInfo,
) -> None:
    """``out`` = elementwise sum of every rank's ``x`` by MPI's Allreduce (in place when ``out``
    is ``x``'s memory)."""
    send = MPI.IN_PLACE if x.data_ptr() == out.data_ptr() else mpi_spec(x)
    call(operation, comm, "Allreduce", send, mpi_spec(out), info.sum_op)


def reduce_scatter_native(
    call: Caller,
    operation: str,
    comm: MPI.Comm,
    x: torch.Tensor,
    counts: list[int],
    out: torch.Tensor,
    info: DtypeInfo,
) -> None:
    """As :func:`reduce_scatter_bytes`, by MPI's Reduce_scatter."""
    call(operation, comm, "Reduce_scatter", mpi_spec(x), mpi_spec(out), counts, info.sum_op)
