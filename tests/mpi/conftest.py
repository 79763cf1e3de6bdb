"""Fixtures for tests that run on every rank of an mpiexec job (any rank count):
``mpiexec -n N python -m pytest --with-mpi tests/mpi``. Cross-rank checks are in tests/helpers.py."""

import pytest
from mpi4py import MPI

import mpicomm


@pytest.fixture(scope="module")
def comm():
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="test")
    yield c
    c.destroy()
