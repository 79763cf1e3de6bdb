"""Soak: thousands of mixed collectives on 4 ranks, every result right, memory and requests flat.

``MPICOMM_SOAK_STEPS`` (default 2000, about a minute here) sets the length; raise it for a longer
soak, e.g. ``MPICOMM_SOAK_STEPS=50000 pytest tests/jobs/test_soak.py``.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import PROGRAMS, run_mpi

STEPS = int(os.environ.get("MPICOMM_SOAK_STEPS", 2000))
RSS_SLOPE = 8192  # bytes per call (16 MiB over 2000 calls); 2.6 MiB of page steps gives ~2 KiB
# Live Python objects: a tensor or request kept per call adds at least one per call (STEPS in
# all); the bounded caches (64 workspace views per communicator) move the count by a few hundred.
OBJECTS_MARGIN = max(1000, STEPS // 2)


@pytest.mark.timeout(120 + STEPS // 10)
def test_soak_four_ranks():
    """Every result exact; the library's holdings flat (workspace bytes, outstanding requests,
    live Python objects), and resident memory without a slope. One RSS reading is not a leak:
    transparent huge pages move it in 2 MiB steps, so it is judged by its slope over 20 samples."""
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
    assert summary["workspace_growth_bytes"] == [0, 0, 0, 0], summary
    assert summary["outstanding_end"] == [0, 0, 0, 0], summary
    assert all(abs(g) < OBJECTS_MARGIN for g in summary["objects_growth"]), summary
    assert all(s < RSS_SLOPE for s in summary["rss_slope_bytes_per_call"]), summary
    assert all(g < 64 << 20 for g in summary["rss_growth_bytes"]), summary  # a gross leak
