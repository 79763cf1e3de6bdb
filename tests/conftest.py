"""Settings for every test. The layout (tests/__init__.py): unit/ runs in one process, jobs/ start
their own mpiexec jobs, mpi/ runs under ``mpiexec -n N python -m pytest --with-mpi tests/mpi``,
system/ needs a real system; tests start mpiexec only through ``tests.helpers.run_mpi``."""

import contextlib
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHM = Path("/dev/shm")


def mpich_segments() -> set[str]:
    """Names of MPICH's shared-memory files in /dev/shm (``mpich_shm_*``)."""
    return {p.name for p in SHM.glob("mpich_shm_*")} if SHM.is_dir() else set()


def in_use(names: set[str]) -> set[str]:
    """Those of ``names`` (files in /dev/shm) that a live process maps or holds open."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            maps = (proc / "maps").read_text()
            used.update(n for n in names if n in maps)
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    used.add(os.readlink(fd).rpartition("/")[2])
    return used & names


def stale_segments(before: set[str]) -> set[str]:
    """MPICH's files in /dev/shm that were not there ``before`` and that no live process maps or
    holds open: what killed jobs left behind. (A job holds its file open from its creation until
    it is mapped, so a job that is starting is never in this set.)"""
    new = mpich_segments() - before
    return new - in_use(new)


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
