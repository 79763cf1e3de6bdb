"""Sums of 16-bit floats: within 1 ulp of the exact sum and identical bits on every rank, by either
algorithm; integer sums exact; fp32 identical bits on every rank."""

import pytest
import torch
from mpi4py import MPI

import mpicomm
from tests.helpers import everywhere, same_bits_everywhere

pytestmark = pytest.mark.mpi


def rank_inputs(dtype, n, scale_spread):
    world = MPI.COMM_WORLD.Get_size()
    xs = []
    for i in range(world):
        gen = torch.Generator().manual_seed(1000 + i)
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        x = x * torch.exp2(torch.randint(-scale_spread, scale_spread + 1, (n,), generator=gen))
        xs.append(x.to(dtype))
    return xs


def within_one_ulp(result, exact):
    """|result - exact| <= the gap between result and its neighbour on each side."""
    bits = result.view(torch.int16)
    up = (bits + 1).view(result.dtype).double()
    down = (bits - 1).view(result.dtype).double()
    r = result.double()
    gap = torch.fmax((up - r).abs(), (r - down).abs())  # fmax: a neighbour of +-0 may be NaN
    return bool(((r - exact).abs() <= gap).all())


@pytest.mark.parametrize("algo", ["auto", "bytes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_narrow_float_sum_within_one_ulp(dtype, algo):
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, allreduce_algo=algo)
    try:
        xs = rank_inputs(dtype, 100_003, 4)
        out = comm.all_reduce(xs[comm.rank])
        exact = sum(x.double() for x in xs)  # exact: few addends of 8/11-bit significands
        ok = out.dtype == dtype and within_one_ulp(out, exact)
        # the promised rounding: fp32 accumulation in rank order, rounded once
        acc = xs[0].float()
        for x in xs[1:]:
            acc = acc + x.float()
        ok = ok and torch.equal(out.view(torch.int16), acc.to(dtype).view(torch.int16))
        assert everywhere(ok)
        assert same_bits_everywhere(out)
    finally:
        comm.destroy()


@pytest.mark.parametrize("algo", ["native", "bytes"])
def test_float32_identical_bits_everywhere(algo):
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, allreduce_algo=algo)
    try:
        xs = rank_inputs(torch.float32, 50_001, 20)
        out = comm.all_reduce(xs[comm.rank])
        exact = sum(x.double() for x in xs)
        bound = comm.world_size * torch.finfo(torch.float32).eps * sum(x.double().abs() for x in xs)
        assert everywhere(bool(((out.double() - exact).abs() <= bound).all()))
        assert same_bits_everywhere(out)
    finally:
        comm.destroy()


@pytest.mark.parametrize("algo", ["native", "bytes"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8], ids=str)
def test_integer_sums_exact_and_wrap_like_torch(dtype, algo):
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, allreduce_algo=algo)
    try:
        info = torch.iinfo(dtype)
        world = comm.world_size
        xs = [
            torch.randint(
                info.min,
                info.max,
                (4097,),
                generator=torch.Generator().manual_seed(i),
                dtype=torch.int64,
            ).to(dtype)
            for i in range(world)
        ]
        expected = xs[0].clone()
        for x in xs[1:]:
            expected += x
        assert everywhere(torch.equal(comm.all_reduce(xs[comm.rank]), expected))
    finally:
        comm.destroy()


def test_bool_sum_is_logical_or(comm):
    world = comm.world_size
    xs = [torch.arange(16) % (i + 2) == 0 for i in range(world)]
    expected = xs[0].clone()
    for x in xs[1:]:
        expected |= x
    assert everywhere(torch.equal(comm.all_reduce(xs[comm.rank]), expected))


def test_large_narrow_reduce_scatter_matches_all_reduce(comm):
    world = comm.world_size
    xs = rank_inputs(torch.bfloat16, 6 * world * 1000, 3)
    xs = [x.reshape(6 * world, 1000) for x in xs]
    full = comm.all_reduce(xs[comm.rank])
    part = comm.reduce_scatter(xs[comm.rank], 0)
    assert everywhere(torch.equal(part, full.chunk(world, 0)[comm.rank]))
