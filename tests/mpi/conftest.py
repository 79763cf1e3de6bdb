"""Fixtures for tests that run on every rank of an mpiexec job (any rank count)."""

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpicomm


@pytest.fixture(scope="module")
def comm():
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="test")
    yield c
    c.destroy()


def everywhere(flag: bool) -> bool:
    """True only if ``flag`` holds on every rank: failures then happen on all ranks together,
    so no rank runs ahead into a collective the others never enter."""
    out = np.zeros(1, dtype=np.int32)
    MPI.COMM_WORLD.Allreduce(np.array([int(bool(flag))], dtype=np.int32), out, op=MPI.MIN)
    return bool(out[0])


def bits(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` in logical order, whatever its strides or dtype."""
    flat = t.contiguous().reshape(-1)
    return flat.as_strided((flat.numel(),), (1,)).view(torch.uint8).numpy().tobytes()


def same_bits_everywhere(t: torch.Tensor) -> bool:
    return len(set(MPI.COMM_WORLD.allgather(bits(t)))) == 1
