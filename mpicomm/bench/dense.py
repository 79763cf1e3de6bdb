"""Thin entries of the dense collectives: all_reduce, all_gather(v), reduce_scatter(v),
broadcast and send/recv, one class each, one method per backend (shared parts in :mod:`.cases`).
"""

from __future__ import annotations

import torch

from .._mpi import MPI
from .cases import (
    GLOO_NO_V,
    Case,
    Entry,
    Skip,
    dist,
    gloo_case,
    host_pair,
    pattern,
    result_case,
    same,
    summed,
    to_numpy,
    uneven,
)


class Gathers(Entry):
    """An all-gather shape: each rank contributes ``1/n`` of the case size, receives all of it."""

    def factor(self, n):
        return (n - 1) / n

    def io(self, n):
        return 1 / n, 1.0


class Scatters(Gathers):
    """A reduce-scatter shape: each rank sends all of the case size, receives ``1/n`` of it."""

    reduces = True

    def io(self, n):
        return 1.0, 1 / n


class AllReduce(Entry):
    name = "all_reduce"
    reduces = True

    def factor(self, n):
        return 2 * (n - 1) / n

    def mpicomm(self, ctx, dtype, count):
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = summed(count, ctx.size, dtype)
        return result_case(lambda: ctx.communicator.all_reduce(x), lambda y: same(y, ref), ctx)

    def mpi4py(self, ctx, dtype, count):
        y, xs, ys = host_pair(pattern(count, ctx.rank, dtype), count)
        ref = summed(count, ctx.size, dtype)
        return Case(run=lambda: ctx.comm.Allreduce(xs, ys, MPI.SUM), check=lambda: same(y, ref))

    def gloo(self, ctx, dtype, count):
        # In place: the timed loop sums zeros (values would otherwise grow every call); the check
        # runs one more call on the real pattern.
        d = dist()
        buf = torch.zeros(count, dtype=dtype, device=ctx.device)

        def check():
            buf.copy_(pattern(count, ctx.rank, dtype))
            d.all_reduce(buf)
            return same(buf, summed(count, ctx.size, dtype))

        return gloo_case(ctx, lambda: d.all_reduce(buf), check)


class AllGather(Gathers):
    name = "all_gather"
    even = True

    @staticmethod
    def _ref(ctx, dtype, count):
        per = count // ctx.size
        return torch.cat([pattern(per, r, dtype) for r in range(ctx.size)])

    def mpicomm(self, ctx, dtype, count):
        x = pattern(count // ctx.size, ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, count)
        return result_case(
            lambda: ctx.communicator.all_gather(x, dim=0), lambda y: same(y, ref), ctx
        )

    def mpi4py(self, ctx, dtype, count):
        per = count // ctx.size
        y, xs, ys = host_pair(pattern(per, ctx.rank, dtype), per * ctx.size)
        ref = self._ref(ctx, dtype, count)
        return Case(run=lambda: ctx.comm.Allgather(xs, ys), check=lambda: same(y, ref))

    def gloo(self, ctx, dtype, count):
        d = dist()
        per = count // ctx.size
        x = pattern(per, ctx.rank, dtype).to(ctx.device)
        y = torch.empty(per * ctx.size, dtype=dtype, device=ctx.device)
        ref = self._ref(ctx, dtype, count)
        return gloo_case(ctx, lambda: d.all_gather_single(y, x), lambda: same(y, ref))


class ReduceScatter(Scatters):
    name = "reduce_scatter"
    even = True

    @staticmethod
    def _ref(ctx, dtype, count):
        per = count // ctx.size
        return summed(per * ctx.size, ctx.size, dtype)[ctx.rank * per : (ctx.rank + 1) * per]

    def mpicomm(self, ctx, dtype, count):
        count -= count % ctx.size
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, count)
        return result_case(
            lambda: ctx.communicator.reduce_scatter(x, dim=0), lambda y: same(y, ref), ctx
        )

    def mpi4py(self, ctx, dtype, count):
        count -= count % ctx.size
        y, xs, ys = host_pair(pattern(count, ctx.rank, dtype), count // ctx.size)
        ref = self._ref(ctx, dtype, count)
        return Case(
            run=lambda: ctx.comm.Reduce_scatter_block(xs, ys, MPI.SUM), check=lambda: same(y, ref)
        )

    def gloo(self, ctx, dtype, count):
        d = dist()
        count -= count % ctx.size
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        y = torch.empty(count // ctx.size, dtype=dtype, device=ctx.device)
        ref = self._ref(ctx, dtype, count)
        return gloo_case(ctx, lambda: d.reduce_scatter_single(y, x), lambda: same(y, ref))


class AllGatherV(Gathers):
    """All-gather of unequal row counts (1:2:..:n), 1-D rows, ``dim=0``."""

    name = "all_gatherv"

    @staticmethod
    def _ref(ctx, dtype, sizes):
        return torch.cat([pattern(s, r, dtype) for r, s in enumerate(sizes)])

    def mpicomm(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        x = pattern(sizes[ctx.rank], ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, sizes)
        return result_case(
            lambda: ctx.communicator.all_gatherv(x, dim=0, sizes=sizes), lambda y: same(y, ref), ctx
        )

    def mpi4py(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        y, xs, ys = host_pair(pattern(sizes[ctx.rank], ctx.rank, dtype), count)
        ref = self._ref(ctx, dtype, sizes)
        return Case(run=lambda: ctx.comm.Allgatherv(xs, [ys, sizes]), check=lambda: same(y, ref))

    def gloo(self, ctx, dtype, count):
        raise Skip(GLOO_NO_V.format("all_gatherv"))


class ReduceScatterV(Scatters):
    """Reduce-scatter to unequal row counts (1:2:..:n), 1-D rows."""

    name = "reduce_scatterv"

    @staticmethod
    def _ref(ctx, dtype, count, sizes):
        start = sum(sizes[: ctx.rank])
        return summed(count, ctx.size, dtype)[start : start + sizes[ctx.rank]]

    def mpicomm(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = self._ref(ctx, dtype, count, sizes)
        return result_case(
            lambda: ctx.communicator.reduce_scatterv(x, dim=0, sizes=sizes),
            lambda y: same(y, ref),
            ctx,
        )

    def mpi4py(self, ctx, dtype, count):
        sizes = uneven(count, ctx.size)
        y, xs, ys = host_pair(pattern(count, ctx.rank, dtype), sizes[ctx.rank])
        ref = self._ref(ctx, dtype, count, sizes)
        return Case(
            run=lambda: ctx.comm.Reduce_scatter(xs, ys, sizes, MPI.SUM),
            check=lambda: same(y, ref),
        )

    def gloo(self, ctx, dtype, count):
        raise Skip(GLOO_NO_V.format("reduce_scatterv"))


class Broadcast(Entry):
    name = "broadcast"

    def mpicomm(self, ctx, dtype, count):
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = pattern(count, 0, dtype)
        return result_case(
            lambda: ctx.communicator.broadcast(x, src=0), lambda y: same(y, ref), ctx
        )

    def mpi4py(self, ctx, dtype, count):
        x = pattern(count, ctx.rank, dtype)
        xs = to_numpy(x)
        ref = pattern(count, 0, dtype)
        return Case(run=lambda: ctx.comm.Bcast(xs, root=0), check=lambda: same(x, ref))

    def gloo(self, ctx, dtype, count):
        d = dist()
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = pattern(count, 0, dtype)
        return gloo_case(ctx, lambda: d.broadcast(x, 0), lambda: same(x, ref))


class SendRecv(Entry):
    """Each rank sends ``count`` elements to rank+1 and receives as many from rank-1.

    Blocking calls, even ranks send first, odd ranks receive first (so on 2 ranks one iteration
    is a round trip). Every backend follows the same order.
    """

    name = "sendrecv"

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
        c, (dst, src) = ctx.communicator, ctx.peers
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        ref = pattern(count, src, dtype)
        shape = x.shape
        run = self._order(ctx, lambda: c.send(x, dst=dst), lambda: c.recv(shape, dtype, src=src))
        return result_case(run, lambda y: same(y, ref), ctx)

    def mpi4py(self, ctx, dtype, count):
        dst, src = ctx.peers
        y, xs, ys = host_pair(pattern(count, ctx.rank, dtype), count)
        ref = pattern(count, src, dtype)
        run = self._order(
            ctx, lambda: ctx.comm.Send(xs, dest=dst), lambda: ctx.comm.Recv(ys, source=src)
        )
        return Case(run=run, check=lambda: same(y, ref))

    def gloo(self, ctx, dtype, count):
        d, (dst, src) = dist(), ctx.peers
        x = pattern(count, ctx.rank, dtype).to(ctx.device)
        y = torch.empty(count, dtype=dtype, device=ctx.device)
        ref = pattern(count, src, dtype)
        run = self._order(ctx, lambda: d.send(x, dst), lambda: d.recv(y, src))
        return gloo_case(ctx, run, lambda: same(y, ref))
