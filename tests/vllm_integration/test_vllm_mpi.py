"""vLLM's own process groups on mpicomm: launches ``vllm_groups.py`` under ``mpiexec``.

Needs vLLM installed beside torch==2.13.0 (see .ci/vllm.sh and docs/vllm.md); skipped where vLLM
is not importable (the project's main test environment), run by the CI vLLM job. Each case is a
single-process pytest test that runs ``timeout T mpiexec -n N python vllm_groups.py ...`` and
requires every rank to print ``VLLM_GROUPS_OK`` and the job to exit 0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# vllm.distributed, not vllm: with tests/ on sys.path this very folder is a namespace "vllm"
pytest.importorskip(
    "vllm.distributed.parallel_state",
    reason="vLLM is not installed (CI job .ci/vllm.sh installs it)",
)

SCRIPT = Path(__file__).with_name("vllm_groups.py")
ROOT = SCRIPT.parents[2]
TIMEOUT = int(os.environ.get("MPICOMM_VLLM_TEST_TIMEOUT", "420"))


def mpiexec() -> str:
    exe = Path(sys.executable).with_name("mpiexec")
    return str(exe) if exe.exists() else (shutil.which("mpiexec") or "mpiexec")


def run(n: int, *args: str, enable: bool = True) -> str:
    env = dict(os.environ)
    env["MPICOMM_VLLM"] = "1" if enable else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        "timeout",
        "-k",
        "10",
        str(TIMEOUT),
        mpiexec(),
        "-n",
        str(n),
        sys.executable,
        str(SCRIPT),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT + 30)
    out = proc.stdout + proc.stderr
    tail = "\n".join(line for line in out.splitlines() if "INFO" not in line)[-6000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}"
    # mpiexec may interleave two ranks' lines: find each rank's marker anywhere in the output.
    oks = set(re.findall(r"VLLM_GROUPS_OK rank=(\d+)", out))
    assert oks == {str(r) for r in range(n)}, f"ranks {sorted(oks)} of {n} reported OK:\n{tail}"
    return out


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
