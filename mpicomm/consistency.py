"""Consistency mode: before a collective, the ranks compare a small fingerprint of their call.

Ranks that disagree on the operation, dtype, shape, dim, sizes or root would otherwise corrupt data
or wait forever. With ``MPICOMM_VALIDATE=1`` (or ``validate=True`` on a communicator) each rank
sends a fixed-size int64 fingerprint over the cpu communicator; every rank receives all of them,
so any disagreement raises the same ``ValueError`` on every rank.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import torch
from mpi4py import MPI

from .calls import Caller
from .dtypes import DTYPES

OPERATIONS = (
    "all_reduce",
    "all_gather",
    "all_gatherv",
    "reduce_scatter",
    "reduce_scatterv",
    "gather",
    "broadcast",
    "dispatch",
    "combine",
    "all_to_allv",
)
_DTYPES = list(DTYPES)
_OP_CODE = {name: i for i, name in enumerate(OPERATIONS)}
_DTYPE_CODE = {dtype: i for i, dtype in enumerate(_DTYPES)}
_MAX_DIMS = 10
WIDTH = 6 + _MAX_DIMS
_PAD = [-1] * _MAX_DIMS
ANY = -2  # a shape entry that may differ between ranks (the rows of a v-collective)


# Operations without a ``dim`` argument: their dim is not shown in messages.
_NO_DIM = {"all_reduce", "broadcast"}
_FIELDS = ("operation", "dtype", "number of dimensions", "dim", "root", "sizes")


class Fingerprint(NamedTuple):
    """One rank's call in numbers: ``row`` (fixed width, exchanged every time) and ``sizes``
    (exchanged only to explain a disagreement)."""

    row: np.ndarray
    sizes: list[int] | None


def fingerprint(
    operation: str,
    tensor: torch.Tensor,
    dim: int = -1,
    sizes: list[int] | None = None,
    root: int = -1,
    rows_vary: bool = False,
) -> Fingerprint:
    """What every rank of a call must share: operation, dtype, shape, dim, sizes, root.

    ``rows_vary``: the first dimension may differ between ranks (the rows of a v-collective).
    Shapes of more than 10 dimensions and the sizes list enter the row as CRC32 hashes.
    """
    shape = list(tensor.shape)
    if rows_vary and shape:
        shape[0] = ANY
    ndim = len(shape)
    if ndim > _MAX_DIMS:
        shape = shape[: _MAX_DIMS - 1] + [zlib.crc32(np.array(shape[_MAX_DIMS - 1 :]).tobytes())]
    sizes_key = -1 if sizes is None else zlib.crc32(np.asarray(sizes, dtype=np.int64).tobytes())
    row = [_OP_CODE[operation], _DTYPE_CODE[tensor.dtype], ndim, dim, root, sizes_key, *shape]
    row += _PAD[: WIDTH - len(row)]
    return Fingerprint(np.array(row, dtype=np.int64), None if sizes is None else list(sizes))


def describe(row: np.ndarray, sizes: list[int] | None = None) -> str:
    """A fingerprint in words: ``all_gather(float32[4, 8], dim=1)``."""
    op, dtype, ndim, dim, root, sizes_key = (int(v) for v in row[:6])
    shape = ["*" if v == ANY else str(int(v)) for v in row[6 : 6 + min(ndim, _MAX_DIMS)]]
    if ndim > _MAX_DIMS:
        shape[-1] = "..."
    text = f"{OPERATIONS[op]}({str(_DTYPES[dtype]).removeprefix('torch.')}[{', '.join(shape)}]"
    if OPERATIONS[op] not in _NO_DIM:
        text += f", dim={dim}"
    if root >= 0:
        text += f", root={root}"
    if sizes_key >= 0:
        text += f", sizes#{sizes_key:08x}" if sizes is None else f", sizes={sizes}"
    return text + ")"


def differences(rows: np.ndarray) -> list[str]:
    """Names of the fields on which the rows (one per rank) differ."""
    fields = [name for i, name in enumerate(_FIELDS) if (rows[:, i] != rows[0, i]).any()]
    if (rows[:, 6:] != rows[0, 6:]).any():
        fields.append("shape")
    return fields


def agree(call: Caller, comm: MPI.Comm, operation: str, mine: Fingerprint) -> None:
    """Exchange ``mine`` on ``comm``; raise the same ``ValueError`` on every rank if any differs.

    One ``Allgather`` of ``WIDTH`` int64 per rank when the ranks agree. When they disagree on the
    sizes, a second ``Allgather`` brings every rank's sizes list for the message (every rank sees
    the same rows, so all of them take part in it).
    """
    world = comm.Get_size()
    rows = np.empty((world, WIDTH), dtype=np.int64)
    call(operation, comm, "Allgather", mine.row, rows)
    every = rows.tobytes()
    if every == every[: len(every) // world] * world:
        return
    fields = differences(rows)
    every_sizes: list[list[int] | None] = [None] * world
    if "sizes" in fields:
        own = np.full(world, -1, dtype=np.int64)
        if mine.sizes is not None and len(mine.sizes) == world:
            own[:] = mine.sizes
        table = np.empty((world, world), dtype=np.int64)
        call(operation, comm, "Allgather", own, table)
        every_sizes = [None if (r < 0).any() else r.tolist() for r in table]
    calls = "; ".join(
        f"rank {i}: {describe(r, s)}"
        for i, (r, s) in enumerate(zip(rows, every_sizes, strict=True))
    )
    raise ValueError(
        f"{operation} on group {call.group!r}: the ranks disagree on {', '.join(fields)}: {calls}"
    )
