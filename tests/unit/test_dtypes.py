"""mpicomm.dtypes, the one dtype table: its rows, its views (checked against lists written out
here, since the other tests take their dtype lists from those views) and its name parsing."""

from __future__ import annotations

import pytest
import torch

from mpicomm.dtypes import (
    BY_SHORT,
    CHECKED,
    DTYPES,
    INEXACT_SUMS,
    NARROW_FLOATS,
    dtype_info,
    parse_dtype,
    short_name,
)


def test_dtype_table_carriers_keep_item_size():
    for dtype, info in DTYPES.items():
        assert info.carrier.itemsize == dtype.itemsize, dtype
        assert info.mpi.Get_size() == dtype.itemsize, dtype
        # narrow floats must never be summed by MPI (no correct bf16/fp16/fp8 sum there)
        if dtype.is_floating_point and dtype.itemsize < 4:
            assert info.sum_op is None and info.accumulate is torch.float32
    with pytest.raises(TypeError, match="not supported"):
        dtype_info(torch.quint8)


def test_views_are_the_documented_lists():
    assert (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    ) == CHECKED
    assert {torch.float32, torch.float64, torch.complex64, torch.complex128} == INEXACT_SUMS
    narrow = {torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
    assert set(CHECKED) & NARROW_FLOATS == narrow
    assert set(DTYPES) >= NARROW_FLOATS and not NARROW_FLOATS & INEXACT_SUMS
    assert all(d.itemsize <= 2 and d.is_floating_point for d in NARROW_FLOATS)


def test_short_names_round_trip():
    assert short_name(torch.bfloat16) == "bf16" and short_name(torch.float8_e5m2) == "f8e5m2"
    assert short_name(torch.quint8) == "quint8"  # not in the table: torch's name
    assert len(BY_SHORT) == len(DTYPES)
    for dtype in DTYPES:
        assert parse_dtype(short_name(dtype)) is dtype
    assert parse_dtype(" BFloat16 ") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'quint8'"):
        parse_dtype("quint8")
    assert parse_dtype("float") is torch.float32  # torch's alias names work too
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("qint8")  # a torch dtype, but not one mpicomm moves


def test_dtype_info_names_the_argument():
    assert dtype_info(torch.int16).short == "i16"
    with pytest.raises(TypeError, match=r"^output: dtype torch.quint8 is not supported"):
        dtype_info(torch.quint8, "output")
