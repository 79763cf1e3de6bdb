"""mpicomm.reduction's local sum on its own (one process): both ways of widening narrow floats
give the bits of a left-to-right float32 sum rounded once, at any rank count."""

from __future__ import annotations

import pytest
import torch

from mpicomm import reduction
from mpicomm.buffers import DTYPES, Workspace

NARROW = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


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
