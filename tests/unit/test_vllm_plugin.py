"""mpicomm.vllm entry point and launcher mapping: single process, vLLM not needed."""

from __future__ import annotations

import pytest

import mpicomm.vllm as mv
from mpicomm.vllm import launch
from tests.helpers import ROOT


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_register_returns_none_unless_enabled(monkeypatch, value):
    monkeypatch.setenv("MPICOMM_VLLM", value)
    assert mv.register() is None


@pytest.mark.parametrize(("device", "want"), [("cpu", mv.CPU_PLATFORM), ("cuda", mv.CUDA_PLATFORM)])
def test_register_returns_the_platform_when_enabled(monkeypatch, device, want):
    monkeypatch.setenv("MPICOMM_VLLM", "1")
    monkeypatch.setenv("MPICOMM_VLLM_DEVICE", device)
    assert mv.register() == want


def test_register_rejects_an_unknown_device(monkeypatch):
    monkeypatch.setenv("MPICOMM_VLLM", "1")
    monkeypatch.setenv("MPICOMM_VLLM_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MPICOMM_VLLM_DEVICE"):
        mv.register()


def test_entry_point_is_declared_in_setup_cfg():
    text = (ROOT / "setup.cfg").read_text()
    assert "vllm.platform_plugins" in text
    assert "mpicomm = mpicomm.vllm:register" in text


@pytest.mark.parametrize(
    ("environ", "want"),
    [
        (
            {
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            },
            {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"},
        ),
        (
            {"PMI_RANK": "2", "PMI_SIZE": "8", "MPI_LOCALRANKID": "0"},
            {"RANK": "2", "WORLD_SIZE": "8", "LOCAL_RANK": "0"},
        ),
        (
            {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0"},
            {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "2"},
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, {"RANK": "1", "WORLD_SIZE": "2"}),
        ({"HOME": "/root"}, None),
    ],
)
def test_torch_env_from_launcher(environ, want):
    assert launch.torch_env_from_launcher(environ) == want


def test_torch_env_from_mpi_single_process(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    from mpi4py import MPI

    env = launch.torch_env_from_mpi(MPI.COMM_SELF)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert 0 < int(env["MASTER_PORT"]) < 65536


def test_export_replaces_a_stale_rank(monkeypatch):
    from mpi4py import MPI

    from mpicomm.launch import LaunchWarning

    monkeypatch.setenv("RANK", "7")
    with pytest.warns(LaunchWarning, match="RANK=7"):
        env = launch.export_torch_env(MPI.COMM_SELF)
    import os

    assert env["RANK"] == os.environ["RANK"] == "0"


def test_launch_wrapper_runs_a_script_with_the_variables(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MPICOMM_VLLM"):
        monkeypatch.delenv(key, raising=False)
    script = tmp_path / "show.py"
    script.write_text(
        "import os, sys\n"
        "print('SEEN', os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['MPICOMM_VLLM'],"
        " sys.argv[1:])\n"
    )
    from mpi4py import MPI

    assert launch.main([str(script), "--flag"]) == 0  # collective: every rank runs this test
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    assert f"SEEN {rank} {size} 1 ['--flag']" in capsys.readouterr().out
