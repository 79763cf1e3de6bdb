"""mpicomm.launch and mpicomm.aborts under mpiexec: rank mapping, torch's variables, an uncaught
exception ending the job. Each test starts ``timeout ... mpiexec -n N python
tests/programs/job.py MODE`` (or ``-c CODE``) and checks its exit status, duration and output."""

from __future__ import annotations

import re
import time

import pytest

from mpicomm import launch
from tests.helpers import PROGRAMS, run_mpi

pytestmark = pytest.mark.skipif(
    launch.env_ranks().world_size not in (None, 1),
    reason="pytest itself runs under an MPI launcher; run this file with plain pytest",
)
JOB = PROGRAMS / "job.py"


def _run_mpi(n: int, args: list[str], timeout: int = 60, env_extra: dict | None = None):
    env = {"MPICOMM_ABORT_ON_EXCEPTION": None, **(env_extra or {})}
    start = time.monotonic()
    proc = run_mpi(n, *args, timeout=timeout, env=env, drop=("PMI_", "OMPI_", "SLURM_"))
    return proc, time.monotonic() - start


def test_mapping_under_mpiexec():
    proc, _ = _run_mpi(3, [str(JOB), "ok"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # hydra may interleave the ranks' lines: match records, not lines
    lines = sorted(
        re.findall(r"job\.py rank \S+ local \S+ env=\w+ sum=\d+ (?:PASS|FAIL)", proc.stdout)
    )
    assert lines == [f"job.py rank {r}/3 local {r}/3 env=hydra sum=3 PASS" for r in range(3)]


def test_export_torch_env_under_mpiexec(tmp_path):
    # Each rank writes its record to its own file: hydra may split one rank's line around
    # another's on stdout.
    code = (
        "import os; from mpicomm import launch; e = launch.export_torch_env(); "
        "keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', "
        "'MASTER_PORT'); "
        "open(os.path.join(os.environ['MPICOMM_TEST_OUT'], e['RANK']), 'w')"
        ".write(' '.join(e[k] for k in keys))"
    )
    env = {"RANK": "", "MASTER_PORT": "", "MPICOMM_TEST_OUT": str(tmp_path)}
    proc, _ = _run_mpi(2, ["-c", code], env_extra=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [(tmp_path / str(r)).read_text().split() for r in range(2)]
    assert [r[:4] for r in rows] == [["0", "0", "2", "2"], ["1", "1", "2", "2"]]
    assert rows[0][4:] == rows[1][4:]  # the same MASTER_ADDR/MASTER_PORT on every rank
    assert rows[0][4] == "127.0.0.1" and int(rows[0][5]) > 0


@pytest.mark.parametrize("mode", ["raise", "thread", "torch"])
def test_uncaught_exception_aborts_job(mode):
    """``torch``: after init_process_group torch's excepthook sends stderr to a buffer while
    mpicomm's hook runs, and prints it only when the hook returns; before, the abort came
    first and the job ended with only "Abort(1)"."""
    proc, elapsed = _run_mpi(2, [str(JOB), mode], timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert elapsed < 30, f"took {elapsed:.1f} s: the job hung instead of aborting\n{out}"
    assert "[rank 1] RuntimeError: deliberate failure in tests/programs/job.py" in out
    where = "thread 'worker'" if mode == "thread" else "the main thread"
    assert f"uncaught RuntimeError in {where} on rank 1 of 2" in out


def test_sys_exit_is_not_an_abort():
    code = (
        "import sys; from mpi4py import MPI; from mpicomm import launch; "
        "launch.install_abort_on_exception(); MPI.COMM_WORLD.Barrier(); "
        "sys.exit(3 if MPI.COMM_WORLD.Get_rank() == 1 else 0)"
    )
    proc, _ = _run_mpi(2, ["-c", code])
    assert "aborting the MPI job" not in proc.stdout + proc.stderr
    assert proc.returncode == 3, proc.stdout + proc.stderr
