"""Runs tests/system/multinode/run.sh (simulated hosts on a virtual network) where that is possible.

It needs root and ``ip netns`` (network namespaces), plus mpiexec on PATH; without them the test
skips and says which one is missing. The script itself brings the hosts up, runs the multi-node
checks, tears everything down and exits 0 only if all of them pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN_SH = Path(__file__).parent / "multinode" / "run.sh"


def _missing() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "the 'ip' tool (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip netns' is not available: {probe.stderr.strip()}"
    if shutil.which("unshare") is None:
        return "util-linux 'unshare' is not installed"
    if shutil.which("mpiexec") is None:
        return "mpiexec is not on PATH"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multinode_run_sh():
    reason = _missing()
    if reason:
        pytest.skip(f"multi-node checks skipped: {reason}")
    checks = os.environ.get("MCMN_CHECKS", "").split()
    proc = subprocess.run(
        ["bash", str(RUN_SH), *checks],
        capture_output=True,
        text=True,
        timeout=880,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    match = re.search(r"^network bytes: (\d+)$", output, re.M)
    assert match, output[-4000:]
    assert int(match.group(1)) > 0, output[-4000:]
