"""Consistency mode: before a collective, the ranks compare a small fingerprint of their call.

Ranks that disagree on the operation, dtype, shape, dim, sizes or root would otherwise corrupt data
or wait forever. With ``MPICOMM_VALIDATE=1`` (or ``validate=True`` on a communicator) each rank
sends a fixed-size int64 fingerprint over the cpu communicator; every rank receives all of them,
so any disagreement raises the same ``ValueError`` on every rank.
"""

from __future__ import annotations

import pickle
import zlib
from typing import NamedTuple

import numpy as np
import torch

from ._mpi import MPI
from .calls import Caller, wait_for
from .dtypes import DTYPES
from .errors import CommunicationError

# The tensor collectives of docs/contract.md (tests and the fuzzer draw from this list too).
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gatherv",
    "reduce_scatter",
    "reduce_scatterv",
    "gather",
    "broadcast",
)
OPERATIONS = (
    *COLLECTIVES,
    "dispatch",
    "combine",
    "all_to_allv",
    "barrier",
)
_DTYPES = list(DTYPES)
_OP_CODE = {name: i for i, name in enumerate(OPERATIONS)}
_DTYPE_CODE = {dtype: i for i, dtype in enumerate(_DTYPES)}
_MAX_DIMS = 10
WIDTH = 7 + _MAX_DIMS  # 6 fields, the shape, then the key of a list of tensors
_LIST = WIDTH - 1
_PAD = [-1] * _MAX_DIMS
ANY = -2  # a shape entry that may differ between ranks (the rows of a v-collective)


# Operations without a ``dim`` argument: their dim is not shown in messages.
_NO_DIM = {"all_reduce", "broadcast", "barrier"}
_FIELDS = ("operation", "dtype", "number of dimensions", "dim", "root", "sizes")


class Fingerprint(NamedTuple):
    """One rank's call in numbers: ``row`` (fixed width, exchanged every time), ``sizes``
    (exchanged only to explain a disagreement) and, for an all-to-all, ``splits``: the rows this
    rank sends to each rank and expects from each (exchanged once the rows agree)."""

    row: np.ndarray
    sizes: list[int] | None
    splits: tuple[list[int], list[int]] | None = None


def fingerprint(
    operation: str,
    tensor: torch.Tensor | list[torch.Tensor],
    dim: int = -1,
    sizes: list[int] | None = None,
    root: int = -1,
    rows_vary: bool = False,
    splits: tuple[list[int], list[int]] | None = None,
) -> Fingerprint:
    """What every rank of a call must share: operation, dtype, shape, dim, sizes, root; and, with
    ``splits`` (an all-to-all's ``(send_rows, recv_rows)``), that what each rank sends each peer
    is what that peer expects from it.

    ``tensor`` may be a list (``all_gatherv`` of several tensors, ``dispatch``): the first entry
    fills the dtype and shape fields, and the list's length with every entry's dtype and shape
    (all but the rows when ``rows_vary``) enter as one more field (``-1`` for a single tensor).
    ``rows_vary``: the first dimension may differ between ranks (the rows of a v-collective).
    Shapes of more than 10 dimensions and the sizes list enter the row as CRC32 hashes.
    """
    tensors = tensor if isinstance(tensor, list | tuple) else [tensor]
    tensor = tensors[0]
    shape = list(tensor.shape)
    if rows_vary and shape:
        shape[0] = ANY
    ndim = len(shape)
    if ndim > _MAX_DIMS:
        shape = shape[: _MAX_DIMS - 1] + [zlib.crc32(np.array(shape[_MAX_DIMS - 1 :]).tobytes())]
    sizes_key = -1 if sizes is None else zlib.crc32(np.asarray(sizes, dtype=np.int64).tobytes())
    row = [_OP_CODE[operation], _DTYPE_CODE[tensor.dtype], ndim, dim, root, sizes_key, *shape]
    row += _PAD[: _LIST - len(row)]
    row.append(_list_key(tensors, rows_vary))
    sizes = None if sizes is None else list(sizes)
    return Fingerprint(np.array(row, dtype=np.int64), sizes, splits)


def _list_key(tensors: list[torch.Tensor], rows_vary: bool) -> int:
    """``-1`` for one tensor; else the count (high bits) and a CRC32 of every entry's dtype,
    number of dimensions and shape (rows left out when they vary)."""
    if len(tensors) == 1:
        return -1
    spec = []
    for t in tensors:
        shape = list(t.shape)
        spec += [_DTYPE_CODE[t.dtype], len(shape), *(shape[1:] if rows_vary else shape)]
    return (len(tensors) << 32) | zlib.crc32(np.array(spec, dtype=np.int64).tobytes())


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
    key = int(row[_LIST])
    if key >= 0:
        text += f", {key >> 32} tensors#{key & 0xFFFFFFFF:08x}"
    return text + ")"


def differences(rows: np.ndarray) -> list[str]:
    """Names of the fields on which the rows (one per rank) differ."""
    fields = [name for i, name in enumerate(_FIELDS) if (rows[:, i] != rows[0, i]).any()]
    if (rows[:, 6:_LIST] != rows[0, 6:_LIST]).any():
        fields.append("shape")
    if (rows[:, _LIST] != rows[0, _LIST]).any():
        fields.append("the list of tensors (length, dtypes or shapes)")
    return fields


def agree(call: Caller, comm: MPI.Comm, operation: str, mine: Fingerprint) -> None:
    """Exchange ``mine`` on ``comm``; raise the same ``ValueError`` on every rank if any differs.

    One ``Allgather`` of ``WIDTH`` int64 per rank when the ranks agree. When they disagree on the
    sizes, a second ``Allgather`` brings every rank's sizes list for the message (every rank sees
    the same rows, so all of them take part in it). An all-to-all whose rows agree takes a second
    ``Allgather`` too: its per-peer splits (:func:`_agree_splits`).
    """
    world = comm.Get_size()
    rows = np.empty((world, WIDTH), dtype=np.int64)
    call(operation, comm, "Allgather", mine.row, rows)
    every = rows.tobytes()
    if every == every[: len(every) // world] * world:
        if mine.splits is not None:  # the same operation everywhere: every rank has splits
            _agree_splits(call, comm, operation, mine.splits)
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


def _agree_splits(
    call: Caller, comm: MPI.Comm, operation: str, splits: tuple[list[int], list[int]]
) -> None:
    """Rank s's ``send_rows[d]`` must be rank d's ``recv_rows[s]`` for every pair; else the same
    ``ValueError`` on every rank (all see the same table), naming the first pairs that differ."""
    world = comm.Get_size()
    table = np.empty((world, 2 * world), dtype=np.int64)
    call(operation, comm, "Allgather", np.array([*splits[0], *splits[1]], dtype=np.int64), table)
    sent, expected = table[:, :world], table[:, world:].T  # both [sender, receiver]
    wrong = np.argwhere(sent != expected)
    if not len(wrong):
        return
    pairs = [
        f"rank {s}'s send_rows[{d}]={sent[s, d]} but rank {d}'s recv_rows[{s}]={expected[s, d]}"
        for s, d in wrong[:4].tolist()
    ]
    more = f" (and {len(wrong) - 4} more pairs)" if len(wrong) > 4 else ""
    raise ValueError(
        f"{operation} on group {call.group!r}: the ranks disagree on the per-peer sizes: "
        f"{'; '.join(pairs)}{more}. Each rank's send_rows[d] must be what rank d passes as "
        f"recv_rows for it"
    )


def agree_construction(
    comm: MPI.Comm,
    group: str,
    timeout: float | None,
    error: BaseException | None,
    values: dict[str, tuple[object, str]] | None,
) -> None:
    """The ranks of ``comm`` agree that a communicator can be built (collective on ``comm``).

    Each rank brings the outcome of its own checks: ``error`` (what it would raise) or ``values``
    (setting name -> (what is compared, how it is shown): the settings that must match). One
    bounded exchange (non-blocking, polled for ``timeout`` seconds; ``None``: unbounded) in which
    a rank that failed takes part too. Then every rank raises alike: a failed rank its own error,
    the others ``ValueError`` naming it; ranks that differ on a setting all raise ``ValueError``.
    A rank that never arrives ends the wait in :class:`~mpicomm.CollectiveTimeoutError`.
    """
    mine = pickle.dumps(
        ("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", values)
    )
    size = comm.Get_size()
    lengths = np.empty(size, dtype=np.int64)
    sent = np.array([len(mine)], dtype=np.int64)
    try:
        wait_for("create", group, comm.Iallgather(sent, lengths), (sent, lengths), timeout)
        every = np.empty(int(lengths.sum()), dtype=np.uint8)
        spec = [every, lengths.tolist(), MPI.BYTE]
        own = np.frombuffer(mine, dtype=np.uint8)
        wait_for("create", group, comm.Iallgatherv(own, spec), (own, every), timeout)
    except MPI.Exception as exc:
        raise CommunicationError(
            f"create on group {group!r}: the ranks could not exchange their checks "
            f"({exc.Get_error_string()})",
            operation="create",
            group=group,
        ) from exc
    ends = np.cumsum(lengths)
    outcomes = [
        pickle.loads(every[e - n : e].tobytes()) for n, e in zip(lengths, ends, strict=True)
    ]
    if error is not None:
        raise error
    failed = [f"rank {r}: {text}" for r, (kind, text) in enumerate(outcomes) if kind == "error"]
    if failed:
        raise ValueError(
            f"group {group!r}: the communicator could not be built on every rank "
            f"({'; '.join(failed)}); no rank built it"
        )
    settings = [v for _, v in outcomes]
    differ = [name for name in values if any(e[name][0] != settings[0][name][0] for e in settings)]
    if differ:
        detail = "; ".join(
            f"{name}: " + ", ".join(f"rank {i} {e[name][1]}" for i, e in enumerate(settings))
            for name in differ
        )
        raise ValueError(
            f"group {group!r}: the ranks disagree on settings that must match on every rank "
            f"({detail}). Set them alike on every rank (environment or MPICommunicator arguments)"
        )
