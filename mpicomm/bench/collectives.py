"""Thin per-collective entries of the benchmark: how to build one timed case per backend.

Each entry turns ``(backend, dtype, count)`` into a :class:`Case`: a ``run()`` that performs the
operation once, and a ``check()`` that verifies the result of the last ``run()`` (or of one fresh
call, for in-place baselines) against a reference computed locally. ``count`` is the element count
of the larger buffer of the operation, as nccl-tests reports it: the result of an all-gather, the
input of a reduce-scatter, the buffer of an all-reduce, broadcast or send.

Inputs follow a periodic pattern of small integers (``-2..2``, different per rank) so that sums
are exact in every dtype, including bfloat16, and the reference needs no tolerance.

Backends: ``mpicomm`` (the communicator under test, torch tensors, fresh results as the contract
requires), ``mpi4py`` (raw buffer API on preallocated numpy arrays: the floor of mpicomm's own
overhead), ``gloo`` (torch.distributed, preallocated outputs where the API allows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

BACKENDS = ("mpicomm", "mpi4py", "gloo")

# Same-size carriers for dtypes numpy / MPI cannot name: their bytes move unchanged.
_CARRIER = {torch.bfloat16: torch.int16, torch.float16: torch.int16}
# Dtypes whose sum raw MPI does correctly (the baseline for reductions).
_MPI_SUM = {torch.float32, torch.float64, torch.int32, torch.int64, torch.int8, torch.uint8}
_UNSIGNED = {torch.uint8}


class Skip(Exception):
    """This backend cannot run this case; the message says why (it goes into the JSON)."""


@dataclass
class Ctx:
    """What the entries need: the MPI communicator for baselines, the communicator under test."""

    comm: MPI.Comm
    communicator: object | None
    gloo: bool
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size


@dataclass
class Case:
    """One operation ready to time: ``run()`` once per iteration, ``check()`` once after."""

    run: Callable[[], object]
    check: Callable[[], bool]


# ---------------------------------------------------------------------------------------------
# inputs and references


def pattern(count: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s input: ``((i + 3 * rank) % 5) - 2`` (no ``- 2`` for unsigned dtypes)."""
    cycle = (torch.arange(5) + 3 * rank) % 5
    if dtype not in _UNSIGNED:
        cycle = cycle - 2
    reps = -(-count // 5) if count else 0
    return cycle.to(dtype).repeat(reps)[:count].contiguous()


def summed(count: int, nranks: int, dtype: torch.dtype) -> torch.Tensor:
    """The exact sum over ranks of :func:`pattern` (computed on one period, then repeated)."""
    period = sum(pattern(5, r, dtype).to(torch.float64) for r in range(nranks))
    reps = -(-count // 5) if count else 0
    return period.to(dtype).repeat(reps)[:count].contiguous()


def uneven(total: int, nranks: int) -> list[int]:
    """Row counts per rank in proportion 1:2:...:n (the last takes the remainder)."""
    weight = nranks * (nranks + 1) // 2
    sizes = [total * (r + 1) // weight for r in range(nranks)]
    sizes[-1] += total - sum(sizes)
    return sizes


def _np(t: torch.Tensor):
    """The numpy view of a CPU tensor (16-bit floats as their int16 carrier)."""
    return t.view(_CARRIER.get(t.dtype, t.dtype)).numpy()


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    out = out.reshape(-1)
    return out.dtype == ref.dtype and out.shape == ref.shape and torch.equal(out.cpu(), ref)


def _device_sync(ctx: Ctx) -> Callable[[], None]:
    if ctx.device.type == "cuda":
        return lambda: torch.cuda.synchronize(ctx.device)
    return lambda: None


def _need_sum(dtype: torch.dtype) -> None:
    if dtype not in _MPI_SUM:
        raise Skip(f"raw MPI has no correct sum for {str(dtype).removeprefix('torch.')}")


def _result_case(call: Callable[[], object], ref: Callable[[object], bool], sync) -> Case:
    """A case whose ``run`` returns a fresh result; ``check`` looks at the last one."""
    box: list = [None]

    def run():
        box[0] = call()
        sync()

    return Case(run=run, check=lambda: ref(box[0]))


def _gloo():
    import torch.distributed as dist

    return dist


# ---------------------------------------------------------------------------------------------
# the entries


class Entry:
    """Base of a collective entry. ``factor(n)`` is nccl-tests' busbw factor."""

    name = ""
    reduces = False

    def factor(self, n: int) -> float:
        return 1.0

    def min_count(self, n: int) -> int:
        return 1

    def build(self, ctx: Ctx, backend: str, dtype: torch.dtype, count: int) -> Case:
        if backend == "gloo" and not ctx.gloo:
            raise Skip("gloo not initialised")
        if backend == "mpicomm" and ctx.communicator is None:
            raise Skip("no mpicomm communicator")
        if self.reduces and backend == "mpi4py":
            _need_sum(dtype)
        return getattr(self, backend)(ctx, dtype, count)

    def gloo(self, ctx: Ctx, dtype: torch.dtype, count: int) -> Case:
        raise Skip(f"torch.distributed gloo has no {self.name}")


class AllReduce(Entry):
    name = "all_reduce"
    reduces = True

    def factor(self, n):
        return 2 * (n - 1) / n

    def mpicomm(self, ctx, dtype, count):
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = summed(count, ctx.size, dtype)
        return _result_case(
            lambda: ctx.communicator.all_reduce(x), lambda y: _same(y, ref), _device_sync(ctx)
        )

    def mpi4py(self, ctx, dtype, count):
        x, y = pattern(count, ctx.rank, dtype), torch.empty(count, dtype=dtype)
        xs, ys = _np(x), _np(y)
        ref = summed(count, ctx.size, dtype)
        return Case(run=lambda: ctx.comm.Allreduce(xs, ys, MPI.SUM), check=lambda: _same(y, ref))

    def gloo(self, ctx, dtype, count):
        # In place: the timed loop sums zeros (values would otherwise grow every call); the check
        # runs one more call on the real pattern.
        dist = _gloo()
        buf = torch.zeros(count, dtype=dtype)

        def check():
            buf.copy_(pattern(count, ctx.rank, dtype))
            dist.all_reduce(buf)
            return _same(buf, summed(count, ctx.size, dtype))

        return Case(run=lambda: dist.all_reduce(buf), check=check)


class AllGather(Entry):
    name = "all_gather"

    def factor(self, n):
        return (n - 1) / n

    def min_count(self, n):
        return n

    @staticmethod
    def _ref(ctx, dtype, count):
        per = count // ctx.size
        return torch.cat([pattern(per, r, dtype) for r in range(ctx.size)])

    def mpicomm(self, ctx, dtype, count):
        x = pattern(count // ctx.size, ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, count)
        return _result_case(
            lambda: ctx.communicator.all_gather(x, dim=0),
            lambda y: _same(y, ref),
            _device_sync(ctx),
        )

    def mpi4py(self, ctx, dtype, count):
        x = pattern(count // ctx.size, ctx.rank, dtype)
        y = torch.empty(count // ctx.size * ctx.size, dtype=dtype)
        xs, ys = _np(x), _np(y)
        ref = self._ref(ctx, dtype, count)
        return Case(run=lambda: ctx.comm.Allgather(xs, ys), check=lambda: _same(y, ref))

    def gloo(self, ctx, dtype, count):
        dist = _gloo()
        x = pattern(count // ctx.size, ctx.rank, dtype)
        y = torch.empty(count // ctx.size * ctx.size, dtype=dtype)
        ref = self._ref(ctx, dtype, count)
        return Case(run=lambda: dist.all_gather_single(y, x), check=lambda: _same(y, ref))


class ReduceScatter(Entry):
    name = "reduce_scatter"
    reduces = True

    def factor(self, n):
        return (n - 1) / n

    def min_count(self, n):
        return n

    @staticmethod
    def _ref(ctx, dtype, count):
        per = count // ctx.size
        return summed(per * ctx.size, ctx.size, dtype)[ctx.rank * per : (ctx.rank + 1) * per]

    def mpicomm(self, ctx, dtype, count):
        count -= count % ctx.size
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, count)
        return _result_case(
            lambda: ctx.communicator.reduce_scatter(x, dim=0),
            lambda y: _same(y, ref),
            _device_sync(ctx),
        )

    def mpi4py(self, ctx, dtype, count):
        count -= count % ctx.size
        x, y = pattern(count, ctx.rank, dtype), torch.empty(count // ctx.size, dtype=dtype)
        xs, ys = _np(x), _np(y)
        ref = self._ref(ctx, dtype, count)
        return Case(
            run=lambda: ctx.comm.Reduce_scatter_block(xs, ys, MPI.SUM), check=lambda: _same(y, ref)
        )

    def gloo(self, ctx, dtype, count):
        dist = _gloo()
        count -= count % ctx.size
        x, y = pattern(count, ctx.rank, dtype), torch.empty(count // ctx.size, dtype=dtype)
        ref = self._ref(ctx, dtype, count)
        return Case(run=lambda: dist.reduce_scatter_single(y, x), check=lambda: _same(y, ref))


class AllGatherV(Entry):
    """All-gather of unequal row counts (1:2:..:n), 1-D rows, ``dim=0``."""

    name = "all_gatherv"
    gloo_note = "torch.distributed gloo has no all_gatherv (its allgather needs equal sizes)"

    def factor(self, n):
        return (n - 1) / n

    @staticmethod
    def _ref(ctx, dtype, sizes):
        return torch.cat([pattern(s, r, dtype) for r, s in enumerate(sizes)])

    def mpicomm(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        x = pattern(sizes[ctx.rank], ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, sizes)
        return _result_case(
            lambda: ctx.communicator.all_gatherv(x, dim=0, sizes=sizes),
            lambda y: _same(y, ref),
            _device_sync(ctx),
        )

    def mpi4py(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        x, y = pattern(sizes[ctx.rank], ctx.rank, dtype), torch.empty(count, dtype=dtype)
        xs, ys = _np(x), _np(y)
        ref = self._ref(ctx, dtype, sizes)
        return Case(run=lambda: ctx.comm.Allgatherv(xs, [ys, sizes]), check=lambda: _same(y, ref))

    def gloo(self, ctx, dtype, count):
        raise Skip(self.gloo_note)


class ReduceScatterV(Entry):
    """Reduce-scatter to unequal row counts (1:2:..:n), 1-D rows."""

    name = "reduce_scatterv"
    reduces = True

    def factor(self, n):
        return (n - 1) / n

    @staticmethod
    def _ref(ctx, dtype, count, sizes):
        start = sum(sizes[: ctx.rank])
        return summed(count, ctx.size, dtype)[start : start + sizes[ctx.rank]]

    def mpicomm(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, count, sizes)
        return _result_case(
            lambda: ctx.communicator.reduce_scatterv(x, dim=0, sizes=sizes),
            lambda y: _same(y, ref),
            _device_sync(ctx),
        )

    def mpi4py(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        x, y = pattern(count, ctx.rank, dtype), torch.empty(sizes[ctx.rank], dtype=dtype)
        xs, ys = _np(x), _np(y)
        ref = self._ref(ctx, dtype, count, sizes)
        return Case(
            run=lambda: ctx.comm.Reduce_scatter(xs, ys, sizes, MPI.SUM),
            check=lambda: _same(y, ref),
        )

    def gloo(self, ctx, dtype, count):
        raise Skip(
            "torch.distributed gloo has no reduce_scatterv (its reduce_scatter needs equal sizes)"
        )


class Broadcast(Entry):
    name = "broadcast"

    def mpicomm(self, ctx, dtype, count):
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = pattern(count, 0, dtype)
        return _result_case(
            lambda: ctx.communicator.broadcast(x, src=0), lambda y: _same(y, ref), _device_sync(ctx)
        )

    def mpi4py(self, ctx, dtype, count):
        x = pattern(count, ctx.rank, dtype)
        xs = _np(x)
        ref = pattern(count, 0, dtype)
        return Case(run=lambda: ctx.comm.Bcast(xs, root=0), check=lambda: _same(x, ref))

    def gloo(self, ctx, dtype, count):
        dist = _gloo()
        x = pattern(count, ctx.rank, dtype)
        ref = pattern(count, 0, dtype)
        return Case(run=lambda: dist.broadcast(x, 0), check=lambda: _same(x, ref))


class SendRecv(Entry):
    """Each rank sends ``count`` elements to rank+1 and receives as many from rank-1.

    Blocking calls, even ranks send first, odd ranks receive first (so on 2 ranks one iteration
    is a round trip). Every backend follows the same order.
    """

    name = "sendrecv"

    def min_count(self, n):
        return 1

    def _order(self, ctx, send, recv):
        if ctx.rank % 2 == 0:

            def run():
                send()
                return recv()
        else:

            def run():
                out = recv()
                send()
                return out

        return run

    def build(self, ctx, backend, dtype, count):
        if ctx.size < 2:
            raise Skip("send/recv needs 2 ranks")
        return super().build(ctx, backend, dtype, count)

    def mpicomm(self, ctx, dtype, count):
        c, dst, src = ctx.communicator, (ctx.rank + 1) % ctx.size, (ctx.rank - 1) % ctx.size
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = pattern(count, src, dtype)
        shape = x.shape
        run = self._order(ctx, lambda: c.send(x, dst=dst), lambda: c.recv(shape, dtype, src=src))
        return _result_case(run, lambda y: _same(y, ref), _device_sync(ctx))

    def mpi4py(self, ctx, dtype, count):
        dst, src = (ctx.rank + 1) % ctx.size, (ctx.rank - 1) % ctx.size
        x, y = pattern(count, ctx.rank, dtype), torch.empty(count, dtype=dtype)
        xs, ys = _np(x), _np(y)
        ref = pattern(count, src, dtype)
        run = self._order(
            ctx, lambda: ctx.comm.Send(xs, dest=dst), lambda: ctx.comm.Recv(ys, source=src)
        )
        return Case(run=run, check=lambda: _same(y, ref))

    def gloo(self, ctx, dtype, count):
        dist = _gloo()
        dst, src = (ctx.rank + 1) % ctx.size, (ctx.rank - 1) % ctx.size
        x, y = pattern(count, ctx.rank, dtype), torch.empty(count, dtype=dtype)
        ref = pattern(count, src, dtype)
        run = self._order(ctx, lambda: dist.send(x, dst), lambda: dist.recv(y, src))
        return Case(run=run, check=lambda: _same(y, ref))


def _moe_shape(count: int, n: int) -> tuple[int, list[int]]:
    """Hidden size and rows per rank for MoE cases of ``count`` gathered hidden-state elements."""
    hidden = max(1, min(1024, count // (4 * n)))
    return hidden, uneven(count // hidden, n)


_EXPERTS = 8


class Dispatch(Entry):
    """MoE dispatch: all-gatherv of hidden states (rows, H) and router logits (rows, 8).

    ``count`` is the element count of the gathered hidden states; rows per rank are 1:2:..:n.
    """

    name = "dispatch"

    def factor(self, n):
        return (n - 1) / n

    @staticmethod
    def _inputs(ctx, dtype, count):
        hidden, sizes = _moe_shape(count, ctx.size)
        rows = sizes[ctx.rank]
        h = pattern(rows * hidden, ctx.rank, dtype).view(rows, hidden)
        g = pattern(rows * _EXPERTS, ctx.rank + 1, dtype).view(rows, _EXPERTS)
        ref_h = torch.cat([pattern(s * hidden, r, dtype) for r, s in enumerate(sizes)])
        ref_g = torch.cat([pattern(s * _EXPERTS, r + 1, dtype) for r, s in enumerate(sizes)])
        return sizes, h, g, ref_h, ref_g

    def mpicomm(self, ctx, dtype, count):
        _, h, g, ref_h, ref_g = self._inputs(ctx, dtype, count)
        h, g = h.to(ctx.device), g.to(ctx.device)
        return _result_case(
            lambda: ctx.communicator.dispatch(h, g),
            lambda out: _same(out[0], ref_h) and _same(out[1], ref_g),
            _device_sync(ctx),
        )

    def mpi4py(self, ctx, dtype, count):
        sizes, h, g, ref_h, ref_g = self._inputs(ctx, dtype, count)
        hidden = h.shape[1]
        oh = torch.empty(sum(sizes) * hidden, dtype=dtype)
        og = torch.empty(sum(sizes) * _EXPERTS, dtype=dtype)
        hs, gs, ohs, ogs = _np(h), _np(g), _np(oh), _np(og)
        ch, cg = [s * hidden for s in sizes], [s * _EXPERTS for s in sizes]

        def run():
            ctx.comm.Allgatherv(hs, [ohs, ch])
            ctx.comm.Allgatherv(gs, [ogs, cg])

        return Case(run=run, check=lambda: _same(oh, ref_h) and _same(og, ref_g))

    def gloo(self, ctx, dtype, count):
        raise Skip(AllGatherV.gloo_note)


class Combine(Entry):
    """MoE combine: reduce-scatterv of (sum(rows), H) back to each rank's rows (after a dispatch)."""

    name = "combine"
    reduces = True

    def factor(self, n):
        return (n - 1) / n

    @staticmethod
    def _inputs(ctx, dtype, count):
        hidden, sizes = _moe_shape(count, ctx.size)
        total = sum(sizes) * hidden
        x = pattern(total, ctx.rank, dtype).view(sum(sizes), hidden)
        start = sum(sizes[: ctx.rank]) * hidden
        ref = summed(total, ctx.size, dtype)[start : start + sizes[ctx.rank] * hidden]
        return hidden, sizes, x, ref

    def mpicomm(self, ctx, dtype, count):
        hidden, sizes, x, ref = self._inputs(ctx, dtype, count)
        rows = sizes[ctx.rank]
        # One dispatch first, so combine knows the row counts (as in a real MoE layer).
        ctx.communicator.dispatch(
            torch.zeros(rows, hidden, dtype=dtype, device=ctx.device),
            torch.zeros(rows, _EXPERTS, dtype=dtype, device=ctx.device),
        )
        x = x.to(ctx.device)
        return _result_case(
            lambda: ctx.communicator.combine(x), lambda y: _same(y, ref), _device_sync(ctx)
        )

    def mpi4py(self, ctx, dtype, count):
        hidden, sizes, x, ref = self._inputs(ctx, dtype, count)
        y = torch.empty(sizes[ctx.rank] * hidden, dtype=dtype)
        xs, ys = _np(x), _np(y)
        counts = [s * hidden for s in sizes]
        return Case(
            run=lambda: ctx.comm.Reduce_scatter(xs, ys, counts, MPI.SUM),
            check=lambda: _same(y, ref),
        )

    def gloo(self, ctx, dtype, count):
        raise Skip(
            "torch.distributed gloo has no reduce_scatterv (its reduce_scatter needs equal sizes)"
        )


ENTRIES: dict[str, Entry] = {
    e.name: e
    for e in (
        AllReduce(),
        AllGather(),
        ReduceScatter(),
        AllGatherV(),
        ReduceScatterV(),
        Broadcast(),
        SendRecv(),
        Dispatch(),
        Combine(),
    )
}
