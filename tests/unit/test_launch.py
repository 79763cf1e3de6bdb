"""Tests of mpicomm.launch: launcher variables, rank mapping, torch env, abort on exception.

The multi-rank tests start ``timeout ... mpiexec -n N python tests/programs/job.py MODE`` as a
subprocess and check its exit status, duration and output.
"""

from __future__ import annotations

import re
import sys
import threading
import time

import pytest

from mpicomm import launch
from tests.helpers import PROGRAMS, run_mpi

# These tests start their own mpiexec/srun/sbatch and assume a one-process pytest.
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


# --- env_ranks: pure functions of the environment --------------------------------------------


def test_env_ranks_plain_python():
    assert launch.env_ranks({}) == launch.EnvRanks("none", 0, 1, 0, 1)


def test_env_ranks_openmpi_wins():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "SLURM_PROCID": "0",
        "SLURM_STEP_ID": "0",
    }
    assert launch.env_ranks(env) == launch.EnvRanks("openmpi", 5, 8, 1, 4)


def test_env_ranks_hydra_inside_sbatch_ignores_stale_slurm_vars():
    # Measured under `mpiexec -n 2` inside `sbatch -n 2`: hydra's proxies are a 1-task srun step.
    env = {
        "PMI_RANK": "1",
        "PMI_SIZE": "2",
        "MPI_LOCALRANKID": "1",
        "MPI_LOCALNRANKS": "2",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "1",
    }
    assert launch.env_ranks(env) == launch.EnvRanks("hydra", 1, 2, 1, 2)


def test_env_ranks_srun_pmi2():
    # Measured under `srun -n 2 --mpi=pmi2` (two nodes' worth of layout here: 3 + 2 tasks).
    env = {
        "PMI_RANK": "4",
        "PMI_SIZE": "5",
        "SLURM_PROCID": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "5",
        "SLURM_STEP_TASKS_PER_NODE": "3,2",
    }
    assert launch.env_ranks(env) == launch.EnvRanks("slurm", 4, 5, 1, 2)


def test_env_ranks_slurm_tasks_per_node_repeat_syntax():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "3",
        "SLURM_STEP_ID": "2",
        "SLURM_STEP_NUM_TASKS": "10",
        "SLURM_STEP_TASKS_PER_NODE": "3(x3),1",
    }
    assert launch.env_ranks(env) == launch.EnvRanks("slurm", 9, 10, 1, 1)


def test_env_ranks_batch_step_alone_is_not_a_launcher():
    # In the batch script itself SLURM_PROCID=0 exists but no step of ranks was launched by PMI.
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    env["SLURM_STEP_NUM_TASKS"] = "1"
    assert launch.env_ranks(env) == launch.EnvRanks("pmi", 3, 4, None, None)


def test_env_ranks_ignores_garbage():
    env = {"OMPI_COMM_WORLD_RANK": "x", "PMI_RANK": "", "SLURM_PROCID": "1"}
    assert launch.env_ranks(env).source == "none"


# --- one process: launch_info, export_torch_env ------------------------------


def test_launch_info_single_process():
    info = launch.launch_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (0, 1, 0, 1)
    assert (info.node_rank, info.num_nodes) == (0, 1)


def test_launch_info_rejects_non_comm():
    with pytest.raises(TypeError, match="comm"):
        launch.launch_info(comm=3)


def test_export_torch_env_single_process():
    env: dict[str, str] = {}
    out = launch.export_torch_env(env=env)
    assert env == out
    assert out["RANK"] == "0" and out["WORLD_SIZE"] == "1"
    assert out["LOCAL_RANK"] == "0" and out["LOCAL_WORLD_SIZE"] == "1"
    assert out["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(out["MASTER_PORT"]) < 65536


def test_export_torch_env_keeps_master_and_replaces_stale_rank():
    env = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555", "RANK": "7"}
    with pytest.warns(launch.LaunchWarning, match="RANK=7"):
        out = launch.export_torch_env(env=env)
    assert (out["MASTER_ADDR"], out["MASTER_PORT"], env["RANK"]) == ("10.1.2.3", "29555", "0")


# --- the hooks, in this process ------------------------------------------------------------


@pytest.fixture
def clean_hooks(monkeypatch):
    launch.uninstall_abort_on_exception()
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    yield
    launch.uninstall_abort_on_exception()


def test_install_is_idempotent_and_uninstalls(clean_hooks):
    before_sys, before_thread = sys.excepthook, threading.excepthook
    assert launch.install_abort_on_exception() is True
    hook_sys, hook_thread = sys.excepthook, threading.excepthook
    assert hook_sys is not before_sys and hook_thread is not before_thread
    assert launch.install_abort_on_exception() is True
    assert (sys.excepthook, threading.excepthook) == (hook_sys, hook_thread)
    launch.uninstall_abort_on_exception()
    assert (sys.excepthook, threading.excepthook) == (before_sys, before_thread)


def test_disable_switch(clean_hooks, monkeypatch):
    monkeypatch.setenv("MPICOMM_ABORT_ON_EXCEPTION", "0")
    before = sys.excepthook
    assert launch.install_abort_on_exception() is False
    assert sys.excepthook is before


def test_one_rank_chains_to_previous_hook_without_abort(clean_hooks):
    seen = []
    sys.excepthook = lambda *exc: seen.append(exc[0])
    launch.install_abort_on_exception()
    try:
        raise KeyError("x")
    except KeyError:
        sys.excepthook(*sys.exc_info())  # world size 1 here: no abort, the user's hook runs
    assert seen == [KeyError]


# --- several ranks, under mpiexec ------------------------------------------------------------


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
