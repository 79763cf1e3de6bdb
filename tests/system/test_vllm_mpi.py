"""vLLM's own process groups on mpicomm: launches ``vllm_groups.py`` under ``mpiexec``.

Needs vLLM installed beside torch==2.13.0 (see .ci/vllm.sh and docs/vllm.md); skipped where vLLM
is not importable (the project's main test environment), run by the CI vLLM job. Each case is a
single-process pytest test that runs ``timeout T mpiexec -n N python vllm_groups.py ...`` and
requires every rank to print ``VLLM_GROUPS_OK`` and the job to exit 0.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import LAUNCHER_VARS, PROGRAMS, run_reporting

pytest.importorskip(
    "vllm.distributed.parallel_state",
    reason="vLLM is not installed (CI job .ci/vllm.sh installs it)",
)

SCRIPT = PROGRAMS / "vllm_groups.py"
TIMEOUT = int(os.environ.get("MPICOMM_VLLM_TEST_TIMEOUT", "420"))


def run(n: int, *args: str, enable: bool = True) -> str:
    env = dict.fromkeys(LAUNCHER_VARS)
    env["MPICOMM_VLLM"] = "1" if enable else "0"
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    return run_reporting(n, SCRIPT, *args, marker="VLLM_GROUPS_OK", timeout=TIMEOUT, env=env)


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_with_expert_parallel_on_2_ranks():
    out = run(2, "--tp", "2", "--ep")
    assert '"tp": [[0, 1], "VllmMPICommunicator"]' in out


@pytest.mark.timeout(TIMEOUT + 60)
def test_dp2_expert_parallel_on_2_ranks():
    out = run(2, "--dp", "2", "--ep")
    assert '"ep": [[0, 1], "VllmMPICommunicator"]' in out


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp4_with_expert_parallel_on_4_ranks():
    out = run(4, "--tp", "4", "--ep")
    assert '"tp": [[0, 1, 2, 3], "VllmMPICommunicator"]' in out


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_x_dp2_expert_parallel_on_4_ranks():
    out = run(4, "--tp", "2", "--dp", "2", "--ep")
    assert '"dp": [[0, 2], "VllmMPICommunicator"]' in out
    assert '"ep": [[0, 1, 2, 3], "VllmMPICommunicator"]' in out


@pytest.mark.timeout(TIMEOUT + 60)
def test_tp2_x_pp2_on_4_ranks():
    out = run(4, "--tp", "2", "--pp", "2")
    assert '"pp": [[0, 2], "VllmMPICommunicator"]' in out


@pytest.mark.timeout(TIMEOUT + 60)
def test_without_the_flag_vllm_keeps_its_own_communicator():
    out = run(2, "--tp", "2", "--expect-native", enable=False)
    assert "VllmMPICommunicator" not in out.split("GROUPS", 1)[1].splitlines()[0]
