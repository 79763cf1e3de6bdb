"""Runs tests/system/multinode/run.sh (simulated hosts on a virtual network) where that is possible.

It needs root and ``ip netns`` (network namespaces), plus mpiexec on PATH; without them the test
skips and says which one is missing. The script itself brings the hosts up, runs the multi-node
checks, tears everything down and exits 0 only if all of them pass.
"""

from __future__ import annotations

import json
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


def _vllm_output(hosts, ids, calls=3, verdict="IDENTICAL"):
    lines = [f"VERDICT: token ids of tp=2 ... vs one rank: {verdict}"]
    for rank, host in enumerate(hosts):
        tp = {"communicator": "VllmMPICommunicator", "calls": {"all_reduce": calls}}
        result = {"rank": rank, "host": host, "ids": ids, "served_by": {"tp": tp}}
        lines.append("VLLM_RESULT " + json.dumps(result))
    return "\n".join(lines)


def test_vllm_verdict_passes_only_a_run_spread_over_the_hosts_equal_to_one_rank():
    """run.sh's vllm checks judge the launch output with progs/vllm_verdict.py."""
    sys.path.insert(0, str(RUN_SH.parent / "progs"))
    try:
        from vllm_verdict import problems
    finally:
        sys.path.pop(0)
    ref, hosts = [[5, 6, 7]], ["mcnode1", "mcnode2"]
    assert problems(_vllm_output(hosts, ref), ref, hosts, 1) == []
    assert problems(_vllm_output(hosts, [[5, 6, 8]]), ref, hosts, 1)  # other ids
    assert problems(_vllm_output(["mcnode1", "mcnode1"], ref), ref, hosts, 1)  # one host only
    assert problems(_vllm_output(hosts, ref, calls=0), ref, hosts, 1)  # mpicomm not used
    assert problems(_vllm_output(hosts, ref, verdict="DIFFERENT"), ref, hosts, 1)
    assert problems(_vllm_output(hosts[:1], ref), ref, hosts, 1)  # a rank missing
