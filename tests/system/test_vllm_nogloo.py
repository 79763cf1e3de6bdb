"""vLLM's process groups with no gloo: ``dist_vllm_nogloo.py`` under ``mpiexec`` (MPICOMM_VLLM=1).

Needs vLLM beside torch==2.13.0; skipped where vLLM is not importable. Run it in the vLLM venv
(``.ci/vllm_cpu_env.sh`` prints its path) from this checkout:
``PYTHONPATH=. <venv>/bin/python -m pytest tests/system/test_vllm_nogloo.py``. Where mpicomm is not
installed in that venv (so vLLM's ``vllm.platform_plugins`` entry point is missing), the test
provides the entry point from a temporary folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import LAUNCHER_VARS, PROGRAMS, ROOT, run_reporting, vllm_entry_point

pytest.importorskip(
    "vllm.distributed.parallel_state",
    reason="vLLM is not installed (run in the vLLM venv: .ci/vllm_cpu_env.sh)",
)

SCRIPT = PROGRAMS / "dist_vllm_nogloo.py"
TIMEOUT = int(os.environ.get("MPICOMM_VLLM_TEST_TIMEOUT", "420"))


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> str:
    """``PYTHONPATH`` for the job: this checkout, plus the entry point if it is not installed."""
    paths = [str(ROOT)]
    if folder := vllm_entry_point(tmp_path_factory.mktemp("entry_point")):
        paths.append(folder)
    return os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])


def run(n: int, pythonpath: str, *args: str) -> str:
    env = dict.fromkeys(LAUNCHER_VARS)
    env.update(
        MPICOMM_VLLM="1",
        MPICOMM_VLLM_TORCH_BACKEND="mpicomm",
        PYTHONPATH=pythonpath,
        OMP_NUM_THREADS="1",
    )
    return run_reporting(n, SCRIPT, *args, marker="VLLM_NOGLOO_OK", timeout=TIMEOUT, env=env)


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_groups_on_mpi_without_gloo(plugin_path):
    out = run(2, plugin_path, "--tp", "2")
    assert '"tp": [[0, 1], "MPIProcessGroup", "MPIProcessGroup"]' in out


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_x_pp2_groups_on_mpi_without_gloo(plugin_path):
    out = run(4, plugin_path, "--tp", "2", "--pp", "2")
    assert '"pp": [[0, 2], "MPIProcessGroup", "MPIProcessGroup"]' in out
