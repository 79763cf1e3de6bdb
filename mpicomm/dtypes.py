"""The dtype table: how each torch dtype travels through MPI and how it is summed.

One row per dtype mpicomm moves (docs/contract.md, "Dtypes"). Everything else that needs a list
of dtypes (the self-check, the benchmark, the tests' parameter lists) takes one of the views
below instead of keeping its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ._mpi import MPI


@dataclass(frozen=True)
class DtypeInfo:
    """How one torch dtype travels through MPI.

    ``carrier`` is a dtype of the same size that numpy and MPI understand (16-bit and 8-bit floats
    travel as integers: their bytes move unchanged). ``mpi_name`` names the MPI datatype and
    ``sum_op_name`` the MPI op that sums the dtype exactly as mpicomm promises, or is ``None`` when
    the sum must be done by torch; the table holds names so that reading it never starts MPI
    (``mpi`` and ``sum_op`` look them up on first use). ``accumulate`` is the dtype sums are
    accumulated in (float32 for 16-bit and 8-bit floats). ``short`` is the name used in tables and
    on command lines (``bf16``).
    """

    dtype: torch.dtype
    short: str
    carrier: torch.dtype
    mpi_name: str
    sum_op_name: str | None
    accumulate: torch.dtype

    @cached_property
    def mpi(self) -> MPI.Datatype:
        return getattr(MPI, self.mpi_name)

    @cached_property
    def sum_op(self) -> MPI.Op | None:
        return None if self.sum_op_name is None else getattr(MPI, self.sum_op_name)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def narrow_float(self) -> bool:
        """A float summed in a wider type and rounded once (16-bit and 8-bit floats)."""
        return self.dtype.is_floating_point and self.accumulate is not self.dtype

    @property
    def inexact_sum(self) -> bool:
        """A float sum MPI performs itself (in an order MPI chooses): float32/64 and complex."""
        return (self.dtype.is_floating_point or self.dtype.is_complex) and not self.narrow_float


def _rows() -> list[tuple]:
    rows = [
        (torch.bool, "bool", torch.bool, "C_BOOL", "LOR", torch.bool),
        (torch.uint8, "u8", torch.uint8, "UINT8_T", "SUM", torch.uint8),
        (torch.int8, "i8", torch.int8, "INT8_T", "SUM", torch.int8),
        (torch.int16, "i16", torch.int16, "INT16_T", "SUM", torch.int16),
        (torch.int32, "i32", torch.int32, "INT32_T", "SUM", torch.int32),
        (torch.int64, "i64", torch.int64, "INT64_T", "SUM", torch.int64),
        (torch.uint16, "u16", torch.uint16, "UINT16_T", "SUM", torch.uint16),
        (torch.uint32, "u32", torch.uint32, "UINT32_T", "SUM", torch.uint32),
        (torch.uint64, "u64", torch.uint64, "UINT64_T", "SUM", torch.uint64),
        (torch.float16, "f16", torch.int16, "INT16_T", None, torch.float32),
        (torch.bfloat16, "bf16", torch.int16, "INT16_T", None, torch.float32),
        (torch.float32, "f32", torch.float32, "FLOAT", "SUM", torch.float32),
        (torch.float64, "f64", torch.float64, "DOUBLE", "SUM", torch.float64),
        (torch.complex64, "c64", torch.complex64, "C_FLOAT_COMPLEX", "SUM", torch.complex64),
        (
            torch.complex128,
            "c128",
            torch.complex128,
            "C_DOUBLE_COMPLEX",
            "SUM",
            torch.complex128,
        ),
    ]
    eights = {
        "float8_e4m3fn": "f8e4m3",
        "float8_e5m2": "f8e5m2",
        "float8_e4m3fnuz": "f8e4m3fnuz",
        "float8_e5m2fnuz": "f8e5m2fnuz",
        # A scale format (powers of two): it moves as bytes but has no meaningful sum.
        "float8_e8m0fnu": "f8e8m0",
    }
    for name, short in eights.items():
        if hasattr(torch, name):
            rows.append((getattr(torch, name), short, torch.uint8, "UINT8_T", None, torch.float32))
    return rows


DTYPES: dict[torch.dtype, DtypeInfo] = {row[0]: DtypeInfo(*row) for row in _rows()}

# Views of the table. CHECKED: what `python -m mpicomm check` and the conformance tests cover (the
# dtypes torch uses for activations and indices, plus the two common float8 formats); the
# unsigned 16-64-bit integers and the other float8 variants move too but are not activations.
_CHECKED_SHORT = (
    "bool", "u8", "i8", "i16", "i32", "i64", "f16", "bf16", "f32", "f64", "c64", "c128",
    "f8e4m3", "f8e5m2",
)  # fmt: skip
BY_SHORT: dict[str, torch.dtype] = {info.short: d for d, info in DTYPES.items()}
CHECKED: tuple[torch.dtype, ...] = tuple(BY_SHORT[s] for s in _CHECKED_SHORT)
NARROW_FLOATS: frozenset[torch.dtype] = frozenset(d for d, i in DTYPES.items() if i.narrow_float)
INEXACT_SUMS: frozenset[torch.dtype] = frozenset(d for d, i in DTYPES.items() if i.inexact_sum)


def dtype_info(dtype: torch.dtype, argument: str = "input_") -> DtypeInfo:
    """The table row for ``dtype``; ``TypeError`` naming ``argument`` for an unsupported dtype."""
    info = DTYPES.get(dtype)
    if info is None:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise TypeError(f"{argument}: dtype {dtype} is not supported (supported: {supported})")
    return info


def short_name(dtype: torch.dtype) -> str:
    """``bf16`` for ``torch.bfloat16``: the table's short name (``str(dtype)`` if not moved)."""
    info = DTYPES.get(dtype)
    return info.short if info is not None else str(dtype).removeprefix("torch.")


def parse_dtype(text: str) -> torch.dtype:
    """A dtype from a short name (``bf16``) or torch's name (``bfloat16``); ``ValueError`` else."""
    key = text.strip().lower()
    if key in BY_SHORT:
        return BY_SHORT[key]
    dtype = getattr(torch, key, None)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES:
        return dtype
    raise ValueError(f"unknown dtype {text!r} (choose from {', '.join(BY_SHORT)})")
