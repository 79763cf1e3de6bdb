"""Settings for every test. The layout (tests/__init__.py): unit/ runs in one process, jobs/ start
their own mpiexec jobs, mpi/ runs under ``mpiexec -n N python -m pytest --with-mpi tests/mpi``,
system/ needs a real system; tests start mpiexec only through ``tests.helpers.run_mpi``."""

import torch

torch.set_num_threads(1)
