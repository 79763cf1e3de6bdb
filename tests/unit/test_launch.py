"""Tests of mpicomm.launch and mpicomm.aborts in one process: launcher variables, torch env, the
abort hooks. Under mpiexec: tests/jobs/test_launch.py."""

from __future__ import annotations

import sys
import threading

import pytest

from mpicomm import launch

# These tests assume a one-process pytest.
pytestmark = pytest.mark.skipif(
    launch.env_ranks().world_size not in (None, 1),
    reason="pytest itself runs under an MPI launcher; run this file with plain pytest",
)
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
