"""The torch backend's reductions other than sums (mpicomm/distributed/ops.py), in one process:
W rows reduced in rank order, 16-bit floats widened and rounded once, bool with logical ops, and
the refusals made before any MPI call."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from mpicomm.distributed import ops


def rows(dtype, world=3, n=64):
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.randint(0, 2, (world, n), generator=g).bool()
    if dtype.is_floating_point:
        return (torch.rand((world, n), generator=g) * 4 - 2).to(dtype)
    return torch.randint(-50, 50, (world, n), generator=g).to(dtype)


@pytest.mark.parametrize("name", ["PRODUCT", "MIN", "MAX"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int32])
def test_rows_reduce_in_rank_order_rounding_16_bit_floats_once(name, dtype):
    r = rows(dtype)
    fn = {"PRODUCT": torch.mul, "MIN": torch.minimum, "MAX": torch.maximum}[name]
    wide = r.float() if dtype.itemsize == 2 and dtype.is_floating_point else r
    want = functools.reduce(fn, list(wide)).to(dtype)
    got = ops.reduce_rows(r, name)
    assert got.dtype == dtype and torch.equal(got, want)
    if name == "PRODUCT" and dtype == torch.bfloat16:
        stepwise = functools.reduce(torch.mul, list(r))  # rounded after every product
        assert not torch.equal(got, stepwise)  # the inputs are chosen so that this shows


@pytest.mark.parametrize("name", ["BAND", "BOR", "BXOR"])
def test_bitwise_rows(name):
    r = rows(torch.int64)
    fn = {"BAND": torch.bitwise_and, "BOR": torch.bitwise_or, "BXOR": torch.bitwise_xor}[name]
    assert torch.equal(ops.reduce_rows(r, name), functools.reduce(fn, list(r)))


@pytest.mark.parametrize(
    ("name", "fn"),
    [
        ("PRODUCT", torch.logical_and),
        ("MIN", torch.logical_and),
        ("MAX", torch.logical_or),
        ("BXOR", torch.logical_xor),
    ],
)
def test_bool_rows_use_logical_ops(name, fn):
    r = rows(torch.bool)
    got = ops.reduce_rows(r, name)
    assert got.dtype == torch.bool and torch.equal(got, functools.reduce(fn, list(r)))


def test_refusals_name_the_operation():
    with pytest.raises(ValueError, match="not supported by the mpicomm backend"):
        ops.op_name(dist._make_nccl_premul_sum(2.0), "all_reduce")
    with pytest.raises(TypeError, match="BAND needs an integer or bool tensor"):
        ops.check("BAND", torch.float32, "all_reduce")
    with pytest.raises(TypeError, match="not defined for complex"):
        ops.check("MAX", torch.complex64, "all_reduce")
    with pytest.raises(TypeError, match="AVG is not defined for bool"):
        ops.check("AVG", torch.bool, "all_reduce")
    assert ops.op_name(dist.ReduceOp.MAX, "all_reduce") == "MAX"


def test_average_truncates_integers_and_divides_floats_in_place():
    i = torch.tensor([7, -7, 8])
    assert ops.average(i, 2) is i and i.tolist() == [3, -3, 4]
    f = torch.tensor([1.0, 3.0])
    assert ops.average(f, 2) is f and f.tolist() == [0.5, 1.5]
