"""Thin entries of the MoE collectives: dispatch and combine (shared parts in :mod:`.cases`)."""

from __future__ import annotations

import torch

from .._mpi import MPI
from .cases import GLOO_NO_V, Case, Skip, pattern, result_case, same, summed, to_numpy, uneven
from .dense import Gathers, Scatters

EXPERTS = 8


def _moe_shape(count: int, n: int) -> tuple[int, list[int]]:
    """Hidden size and rows per rank for MoE cases of ``count`` gathered hidden-state elements."""
    hidden = max(1, min(1024, count // (4 * n)))
    return hidden, uneven(count // hidden, n)


class Dispatch(Gathers):
    """MoE dispatch: all-gatherv of hidden states (rows, H) and router logits (rows, 8).

    ``count`` is the element count of the gathered hidden states; rows per rank are 1:2:..:n.
    """

    name = "dispatch"

    @staticmethod
    def _inputs(ctx, dtype, count):
        hidden, sizes = _moe_shape(count, ctx.size)
        rows = sizes[ctx.rank]
        h = pattern(rows * hidden, ctx.rank, dtype).view(rows, hidden)
        g = pattern(rows * EXPERTS, ctx.rank + 1, dtype).view(rows, EXPERTS)
        ref_h = torch.cat([pattern(s * hidden, r, dtype) for r, s in enumerate(sizes)])
        ref_g = torch.cat([pattern(s * EXPERTS, r + 1, dtype) for r, s in enumerate(sizes)])
        return sizes, h, g, ref_h, ref_g

    def mpicomm(self, ctx, dtype, count):
        _, h, g, ref_h, ref_g = self._inputs(ctx, dtype, count)
        h, g = h.to(ctx.device), g.to(ctx.device)
        return result_case(
            lambda: ctx.communicator.dispatch(h, g),
            lambda out: same(out[0], ref_h) and same(out[1], ref_g),
            ctx,
        )

    def mpi4py(self, ctx, dtype, count):
        sizes, h, g, ref_h, ref_g = self._inputs(ctx, dtype, count)
        hidden = h.shape[1]
        oh = torch.empty(sum(sizes) * hidden, dtype=dtype)
        og = torch.empty(sum(sizes) * EXPERTS, dtype=dtype)
        hs, gs, ohs, ogs = to_numpy(h), to_numpy(g), to_numpy(oh), to_numpy(og)
        ch, cg = [s * hidden for s in sizes], [s * EXPERTS for s in sizes]

        def run():
            ctx.comm.Allgatherv(hs, [ohs, ch])
            ctx.comm.Allgatherv(gs, [ogs, cg])

        return Case(run=run, check=lambda: same(oh, ref_h) and same(og, ref_g))

    def gloo(self, ctx, dtype, count):
        raise Skip(GLOO_NO_V.format("all_gatherv"))


class Combine(Scatters):
    """MoE combine: reduce-scatterv of (sum(rows), H) back to each rank's rows (after a dispatch)."""

    name = "combine"

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
            torch.zeros(rows, EXPERTS, dtype=dtype, device=ctx.device),
        )
        x = x.to(ctx.device)
        return result_case(lambda: ctx.communicator.combine(x), lambda y: same(y, ref), ctx)

    def mpi4py(self, ctx, dtype, count):
        hidden, sizes, x, ref = self._inputs(ctx, dtype, count)
        y = torch.empty(sizes[ctx.rank] * hidden, dtype=dtype)
        xs, ys = to_numpy(x), to_numpy(y)
        counts = [s * hidden for s in sizes]
        return Case(
            run=lambda: ctx.comm.Reduce_scatter(xs, ys, counts, MPI.SUM),
            check=lambda: same(y, ref),
        )

    def gloo(self, ctx, dtype, count):
        raise Skip(GLOO_NO_V.format("reduce_scatterv"))
