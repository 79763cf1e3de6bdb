"""Soak: thousands of mixed collectives on 4 ranks, every result right, memory and requests flat.

``MPICOMM_SOAK_STEPS`` (default 2000, about a minute here) sets the length; raise it for a longer
soak, e.g. ``MPICOMM_SOAK_STEPS=50000 pytest tests/unit/test_soak.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import PROGRAMS, run_mpi

STEPS = int(os.environ.get("MPICOMM_SOAK_STEPS", 2000))
RSS_MARGIN = 8 << 20  # bytes a rank's resident memory may drift after warm-up


@pytest.mark.timeout(120 + STEPS // 10)
def test_soak_four_ranks():
    bound = 100 + STEPS // 10
    env = {"MPICOMM_TIMEOUT": None, "MPICOMM_VALIDATE": None}
    proc = run_mpi(4, str(PROGRAMS / "faults" / "soak.py"), str(STEPS), timeout=bound, env=env)
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SOAK ")]
    assert lines, f"no summary (exit {proc.returncode}):\n{output[-3000:]}"
    summary = json.loads(lines[-1][5:])
    print(summary)
    assert summary["failures"] == 0, summary["first_failures"]
    assert proc.returncode == 0, output[-3000:]
    assert summary["calls"] >= STEPS
    assert all(g < RSS_MARGIN for g in summary["rss_growth_bytes"]), summary
    # after the first quarter, flat: a leak per call would show as a steady climb
    assert all(m[-1] - m[0] < 2 for m in summary["rss_marks_mib"]), summary
    assert summary["workspace_growth_bytes"] == [0, 0, 0, 0], summary
    assert summary["outstanding_end"] == [0, 0, 0, 0], summary
