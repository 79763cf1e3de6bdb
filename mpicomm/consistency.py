"""Consistency mode: before a collective, the ranks compare a small fingerprint of their call.

Ranks that disagree on the operation, dtype, shape, dim, sizes or root would otherwise corrupt data
or wait forever. With ``MPICOMM_VALIDATE=1`` (or ``validate=True`` on a communicator) each rank
sends a fixed-size int64 fingerprint over the cpu communicator; every rank receives all of them,
so any disagreement raises the same ``ValueError`` on every rank.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from mpi4py import MPI

from .buffers import DTYPES
from .calls import Caller

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
)
_DTYPES = list(DTYPES)
_MAX_DIMS = 10
WIDTH = 6 + _MAX_DIMS
ANY = -2  # a shape entry that may differ between ranks (the rows of a v-collective)


def fingerprint(
    operation: str,
    tensor: torch.Tensor,
    dim: int = -1,
    sizes: list[int] | None = None,
    root: int = -1,
    rows_vary: bool = False,
) -> np.ndarray:
    """The int64 vector that every rank of a call must share."""
    shape = list(tensor.shape)
    if rows_vary and shape:
        shape[0] = ANY
    if len(shape) > _MAX_DIMS:
        shape = shape[: _MAX_DIMS - 1] + [zlib.crc32(np.array(shape[_MAX_DIMS - 1 :]).tobytes())]
    sizes_key = -1 if sizes is None else zlib.crc32(np.asarray(sizes, dtype=np.int64).tobytes())
    row = [OPERATIONS.index(operation), _DTYPES.index(tensor.dtype), tensor.dim(), dim, root]
    row += [sizes_key, *shape, *([-1] * (_MAX_DIMS - len(shape)))]
    return np.asarray(row, dtype=np.int64)


def describe(row: np.ndarray, sizes: list[int] | None = None) -> str:
    """A fingerprint in words: ``all_gather(float32[4, 8], dim=1)``."""
    op, dtype, ndim, dim, root, sizes_key = (int(v) for v in row[:6])
    shape = ["*" if v == ANY else str(int(v)) for v in row[6 : 6 + min(ndim, _MAX_DIMS)]]
    text = f"{OPERATIONS[op]}({str(_DTYPES[dtype]).removeprefix('torch.')}[{', '.join(shape)}]"
    text += f", dim={dim}"
    if root >= 0:
        text += f", root={root}"
    if sizes_key >= 0:
        text += f", sizes#{sizes_key:08x}" if sizes is None else f", sizes={sizes}"
    return text + ")"


def agree(call: Caller, comm: MPI.Comm, operation: str, row: np.ndarray) -> None:
    """Exchange ``row`` on ``comm``; raise ``ValueError`` on every rank if any rank differs."""
    rows = np.empty((comm.Get_size(), WIDTH), dtype=np.int64)
    call(operation, comm, "Allgather", row, rows)
    if (rows == rows[0]).all():
        return
    calls = "; ".join(f"rank {i}: {describe(r)}" for i, r in enumerate(rows))
    raise ValueError(f"{operation} on group {call.group!r}: the ranks disagree: {calls}")
