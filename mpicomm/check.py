"""``python -m mpicomm check``: every collective and dtype on this job's ranks, against a reference.

Each rank builds every rank's input from a seed, so it can compute the expected result locally
(``torch.cat`` for gathers, a rank-ordered sum for reductions) and compare it with what the
communicator returned. Sums of float32/float64/complex, which MPI may add in another order, are
compared within a tolerance and must have identical bits on every rank; every other result must
match exactly. The table is printed on rank 0; the exit status is 0 only if every cell passed on
every rank.
"""

from __future__ import annotations

import traceback
import zlib
from collections.abc import Callable

import numpy as np
import torch

from ._mpi import MPI
from .communicator import MPICommunicator
from .dtypes import CHECKED, INEXACT_SUMS, dtype_info, short_name

DTYPES: list[tuple[str, torch.dtype]] = [(short_name(d), d) for d in CHECKED]
_INEXACT_SUM = INEXACT_SUMS


def make_input(dtype: torch.dtype, rank: int, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """Rank ``rank``'s deterministic input of ``shape`` and ``dtype``."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}/{rank}/{shape}/{salt}".encode()))
    if dtype is torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if not dtype.is_floating_point and not dtype.is_complex:
        low = 0 if dtype is torch.uint8 else -9
        return torch.randint(low, 10, shape, generator=gen, dtype=torch.int64).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def reference_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The rank-ordered sum mpicomm promises: accumulated in the dtype's accumulation type (float32
    for 16-bit and 8-bit floats), rounded once."""
    info = dtype_info(tensors[0].dtype)
    acc = tensors[0].to(info.accumulate).clone()
    for t in tensors[1:]:
        acc = acc | t if info.dtype is torch.bool else acc + t.to(info.accumulate)
    return acc.to(info.dtype)


def same(result: torch.Tensor | None, expected: torch.Tensor) -> bool:
    """Equal shapes and dtypes, and equal values (within a tolerance for inexact float sums)."""
    if result is None or result.shape != expected.shape or result.dtype != expected.dtype:
        return False
    if not result.is_contiguous():
        return False
    carrier = dtype_info(expected.dtype).carrier
    return bool(torch.equal(result.view(carrier), expected.contiguous().view(carrier)))


def close(result: torch.Tensor, expected: torch.Tensor) -> bool:
    """As :func:`same`, within a relative tolerance for float32/float64/complex sums."""
    if result.shape != expected.shape or result.dtype != expected.dtype:
        return False
    tol = 1e-5 if result.dtype in (torch.float32, torch.complex64) else 1e-12
    return bool(torch.allclose(result, expected, rtol=tol, atol=tol))


class _Case:
    def __init__(self, comm: MPICommunicator, dtype: torch.dtype, salt: int) -> None:
        self.comm, self.dtype, self.salt = comm, dtype, salt
        self.world, self.rank = comm.world_size, comm.rank

    def inputs(self, shape: tuple[int, ...], transpose: bool = False) -> list[torch.Tensor]:
        if transpose:
            return [
                make_input(self.dtype, i, shape[::-1], self.salt).t() for i in range(self.world)
            ]
        return [make_input(self.dtype, i, shape, self.salt) for i in range(self.world)]

    def identical_everywhere(self, result: torch.Tensor) -> bool:
        data = result.contiguous().view(torch.uint8).numpy().tobytes()
        return len(set(self.comm.cpu_group.allgather(zlib.crc32(data)))) == 1

    def unchanged(self, before: torch.Tensor, after: torch.Tensor) -> bool:
        return same(after.contiguous(), before)


def _all_reduce(case: _Case) -> bool:
    ok = True
    for transpose in (False, True):
        xs = case.inputs((5, 3 * case.world), transpose)
        mine, keep = xs[case.rank], xs[case.rank].clone()
        result = case.comm.all_reduce(mine)
        expected = reference_sum(xs)
        match = close(result, expected) if case.dtype in _INEXACT_SUM else same(result, expected)
        ok &= match and case.identical_everywhere(result) and case.unchanged(keep, mine)
    return ok


def _all_gather(case: _Case) -> bool:
    ok = True
    for dim in (0, -1):
        xs = case.inputs((3, 4), transpose=dim == -1)
        ok &= same(case.comm.all_gather(xs[case.rank], dim), torch.cat(xs, dim))
    return ok


def _all_gatherv(case: _Case) -> bool:
    sizes = [i % 3 + 1 for i in range(case.world)]
    xs = [make_input(case.dtype, i, (sizes[i], 5), case.salt) for i in range(case.world)]
    result = case.comm.all_gatherv([xs[case.rank], xs[case.rank][:, :2]], 0, sizes)
    return same(result[0], torch.cat(xs)) and same(result[1], torch.cat([x[:, :2] for x in xs]))


def _reduce_scatter(case: _Case) -> bool:
    ok = True
    for dim in (0, -1):
        xs = case.inputs((2 * case.world, 2 * case.world), transpose=dim == -1)
        result = case.comm.reduce_scatter(xs[case.rank], dim)
        expected = reference_sum(xs).chunk(case.world, dim)[case.rank].contiguous()
        ok &= close(result, expected) if case.dtype in _INEXACT_SUM else same(result, expected)
    return ok


def _reduce_scatterv(case: _Case) -> bool:
    sizes = [i % 3 + 1 for i in range(case.world)]
    xs = case.inputs((sum(sizes), 4))
    result = case.comm.reduce_scatterv(xs[case.rank], 0, sizes)
    start = sum(sizes[: case.rank])
    expected = reference_sum(xs)[start : start + sizes[case.rank]]
    return close(result, expected) if case.dtype in _INEXACT_SUM else same(result, expected)


def _gather(case: _Case) -> bool:
    dst = case.world - 1
    xs = case.inputs((2, 3))
    result = case.comm.gather(xs[case.rank], dst, -1)
    return same(result, torch.cat(xs, -1)) if case.rank == dst else result is None


def _broadcast(case: _Case) -> bool:
    src = case.world // 2
    xs = case.inputs((3, 5))
    return same(case.comm.broadcast(xs[case.rank], src), xs[src])


def _send_recv(case: _Case) -> bool:
    xs = case.inputs((4, 3))
    comm, rank, world = case.comm, case.rank, case.world
    if world == 1:
        return True
    if rank % 2 == 0:
        comm.send(xs[rank])
        got = comm.recv((4, 3), case.dtype)
    else:
        got = comm.recv((4, 3), case.dtype)
        comm.send(xs[rank])
    return same(got, xs[(rank - 1) % world])


def _dispatch_combine(case: _Case) -> bool:
    sizes = [i % 3 + 1 for i in range(case.world)]
    hs = [make_input(case.dtype, i, (sizes[i], 6), case.salt) for i in range(case.world)]
    logits = [make_input(torch.float32, i, (sizes[i], 4), case.salt) for i in range(case.world)]
    gathered, got_logits = case.comm.dispatch(hs[case.rank], logits[case.rank])
    ok = same(gathered, torch.cat(hs)) and same(got_logits, torch.cat(logits))
    combined = case.comm.combine(gathered)
    start = sum(sizes[: case.rank])
    expected = reference_sum([torch.cat(hs)] * case.world)[start : start + sizes[case.rank]]
    match = close if case.dtype in _INEXACT_SUM else same
    return ok and match(combined, expected)


COLLECTIVES: list[tuple[str, Callable[[_Case], bool]]] = [
    ("all_reduce", _all_reduce),
    ("all_gather", _all_gather),
    ("all_gatherv", _all_gatherv),
    ("reduce_scatter", _reduce_scatter),
    ("reduce_scatterv", _reduce_scatterv),
    ("gather", _gather),
    ("broadcast", _broadcast),
    ("send/recv", _send_recv),
    ("dispatch/combine", _dispatch_combine),
]


def run(comm: MPICommunicator, verbose: bool = False) -> tuple[np.ndarray, list[str]]:
    """Run every collective x dtype; returns the pass matrix agreed by all ranks and the errors
    this rank saw."""
    passed = np.zeros((len(COLLECTIVES), len(DTYPES)), dtype=np.int32)
    errors = []
    for i, (name, fn) in enumerate(COLLECTIVES):
        for j, (short, dtype) in enumerate(DTYPES):
            try:
                passed[i, j] = int(fn(_Case(comm, dtype, salt=i * 100 + j)))
            except Exception as exc:  # noqa: BLE001 - a check reports every failure as a cell
                errors.append(f"rank {comm.rank}: {name}/{short}: {exc!r}")
                if verbose:
                    traceback.print_exc()
                if comm.broken:
                    raise
    everywhere = np.empty_like(passed)
    comm.cpu_group.Allreduce(passed, everywhere, op=MPI.MIN)
    return everywhere, errors


def table(passed: np.ndarray) -> str:
    """The pass/fail matrix as text, with a closing count line."""
    width = max(len(name) for name, _ in COLLECTIVES)
    lines = [" " * width + " " + " ".join(f"{s:>6}" for s, _ in DTYPES)]
    for (name, _), row in zip(COLLECTIVES, passed, strict=True):
        cells = " ".join(f"{'ok' if v else 'FAIL':>6}" for v in row)
        lines.append(f"{name:<{width}} {cells}")
    good = int(passed.sum())
    lines.append(f"check: {good} passed, {passed.size - good} failed")
    return "\n".join(lines)
