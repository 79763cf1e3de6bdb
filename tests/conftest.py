"""Settings for every test. The layout (tests/__init__.py): unit/ runs in one process, jobs/ start
their own mpiexec jobs, mpi/ runs under ``mpiexec -n N python -m pytest --with-mpi tests/mpi``,
system/ needs a real system; tests start mpiexec only through ``tests.helpers.run_mpi``."""

import contextlib

import pytest
import torch

from tests.shm_files import SHM, mpich_segments, stale_segments

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _remove_mpich_segments_of_killed_jobs():
    """MPICH removes its /dev/shm file when a job ends normally; the jobs tests kill on purpose (a
    rank killed, a timeout) leave theirs behind, 1-3 MB each, and a CI machine gathers them run
    after run. At the end of the session, remove the ones that appeared during it
    (:func:`stale_segments`; mpicomm's own files are checked by the tests themselves)."""
    before = mpich_segments()
    yield
    for name in stale_segments(before):
        with contextlib.suppress(OSError):
            (SHM / name).unlink()
