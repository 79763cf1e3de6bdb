"""vLLM's process groups with no gloo: ``dist_vllm_nogloo.py`` under ``mpiexec`` (MPICOMM_VLLM=1).

Needs vLLM beside torch==2.13.0; skipped where vLLM is not importable. Run it in the vLLM venv
(``.ci/vllm_cpu_env.sh`` prints its path) from this checkout:
``PYTHONPATH=. <venv>/bin/python -m pytest tests/system/test_vllm_nogloo.py``. Where mpicomm is not
installed in that venv (so vLLM's ``vllm.platform_plugins`` entry point is missing), the test
provides the entry point from a temporary folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

import pytest

from tests.helpers import PROGRAMS, ROOT, run_mpi

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
    plugins = importlib.metadata.entry_points(group="vllm.platform_plugins")
    if not any(ep.name == "mpicomm" for ep in plugins):
        folder = tmp_path_factory.mktemp("entry_point")
        info = folder / "mpicomm_test_plugin-0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mpicomm-test-plugin\n")
        (info / "entry_points.txt").write_text(
            "[vllm.platform_plugins]\nmpicomm = mpicomm.vllm:register\n"
        )
        paths.append(str(folder))
    return os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")])


def run(n: int, pythonpath: str, *args: str) -> str:
    env = dict.fromkeys(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
    env.update(
        MPICOMM_VLLM="1",
        MPICOMM_VLLM_TORCH_BACKEND="mpicomm",
        PYTHONPATH=pythonpath,
        OMP_NUM_THREADS="1",
    )
    proc = run_mpi(n, str(SCRIPT), *args, timeout=TIMEOUT, env=env)
    out = proc.stdout + proc.stderr
    tail = "\n".join(line for line in out.splitlines() if "INFO" not in line)[-6000:]
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited {proc.returncode}:\n{tail}"
    oks = set(re.findall(r"VLLM_NOGLOO_OK rank=(\d+)", out))
    assert oks == {str(r) for r in range(n)}, f"ranks {sorted(oks)} of {n} reported OK:\n{tail}"
    return out


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_groups_on_mpi_without_gloo(plugin_path):
    out = run(2, plugin_path, "--tp", "2")
    assert '"tp": [[0, 1], "MPIProcessGroup", "MPIProcessGroup"]' in out


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_x_pp2_groups_on_mpi_without_gloo(plugin_path):
    out = run(4, plugin_path, "--tp", "2", "--pp", "2")
    assert '"pp": [[0, 2], "MPIProcessGroup", "MPIProcessGroup"]' in out
