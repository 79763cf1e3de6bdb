"""mpicomm.reduction's local sum on its own (one process): both ways of widening narrow floats
give the bits of a left-to-right float32 sum rounded once, at any rank count."""

from __future__ import annotations

import pytest
import torch

from mpicomm import reduction
from mpicomm.buffers import Workspace
from mpicomm.dtypes import CHECKED, DTYPES, NARROW_FLOATS

NARROW = [d for d in CHECKED if d in NARROW_FLOATS]


def reference(parts: torch.Tensor) -> torch.Tensor:
    acc = parts[0].to(torch.float32)
    for row in parts[1:]:
        acc = acc + row.to(torch.float32)
    return acc.to(parts.dtype)


@pytest.mark.parametrize("widen_whole_below", [0, 1 << 40], ids=["row_by_row", "whole"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_narrow_sums_in_rank_order(monkeypatch, dtype, world, widen_whole_below):
    monkeypatch.setattr(reduction, "WIDEN_WHOLE_BELOW", widen_whole_below)
    gen = torch.Generator().manual_seed(world)
    parts = (torch.randn(world, 1001, generator=gen) * 8).clamp(-200, 200).to(dtype)
    out = torch.empty(1001, dtype=dtype)
    reduction.sum_in_rank_order(parts, out, DTYPES[dtype], Workspace())
    want = reference(parts)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32, torch.float64], ids=str)
def test_wide_sums_in_rank_order(dtype, world):
    parts = (torch.randn(world, 257, dtype=torch.float64) * 100).to(dtype)
    out = torch.empty(257, dtype=dtype)
    reduction.sum_in_rank_order(parts, out, DTYPES[dtype], Workspace())
    want = parts[0].clone()
    for row in parts[1:]:
        want = want + row
    assert torch.equal(out, want)


def _special(dtype: torch.dtype) -> torch.Tensor:
    """Values where a sum can go wrong: signed zeros, subnormals, the largest finite values
    (overflow), infinities, NaN, and pairs far apart in exponent."""
    info = torch.finfo(dtype)
    values = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, info.eps, 1.0]
    values += [-1.0, 3.0, 1e-3, -1e3, float("inf"), float("-inf"), float("nan")]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_two_rank_sum_of_16_bit_floats_is_exact(dtype):
    """The two-rank shortcut (one torch.add) gives the bits of float32 add + one rounding, for
    every pair of special values and for random data across the whole exponent range."""
    special = _special(dtype)
    a = special.repeat_interleave(len(special))
    b = special.repeat(len(special))
    gen = torch.Generator().manual_seed(2)
    scale = torch.exp2(torch.randint(-20, 20, (2, 50000), generator=gen).float())
    noise = (torch.randn(2, 50000, generator=gen) * scale).to(dtype)
    parts = torch.cat([torch.stack([a, b]), noise], 1)
    out = torch.empty(parts.shape[1], dtype=dtype)
    reduction.sum_in_rank_order(parts, out, DTYPES[dtype], Workspace())
    want = reference(parts)
    same = out.view(torch.int16) == want.view(torch.int16)  # NaNs too: both canonicalise
    assert bool(same.all()), parts[:, ~same][:, :8]
