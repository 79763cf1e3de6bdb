"""Shared fixtures. Multi-rank tests live in tests/mpi/ and run under
``mpiexec -n N python -m pytest --with-mpi tests/mpi``; every other test runs in one process."""

import torch

torch.set_num_threads(1)
