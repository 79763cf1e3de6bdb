"""Fuzzing (hypothesis) on 3 ranks: every call returns the reference result or raises the
documented error on every rank. ``MPICOMM_FUZZ_EXAMPLES`` (default 300) sets the number of cases.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers import PROGRAMS, run_mpi

pytest.importorskip("hypothesis")

EXAMPLES = int(os.environ.get("MPICOMM_FUZZ_EXAMPLES", 300))


@pytest.mark.timeout(150 + EXAMPLES // 2)
def test_fuzz_three_ranks():
    bound = 120 + EXAMPLES // 2
    env = {"MPICOMM_TIMEOUT": "30", "MPICOMM_VALIDATE": None}
    proc = run_mpi(3, str(PROGRAMS / "faults" / "fuzz.py"), str(EXAMPLES), timeout=bound, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 124, f"the fuzz run hung:\n{output[-4000:]}"
    match = re.search(r"FUZZ examples=(\d+) with_result=(\d+) status=(\d+)", proc.stdout)
    assert match, f"no summary (exit {proc.returncode}):\n{output[-4000:]}"
    examples, with_result, status = map(int, match.groups())
    assert status == 0 and proc.returncode == 0, output[-6000:]
    assert examples == EXAMPLES
    # both halves of the property were exercised: results checked, and errors checked
    assert 0.2 * examples < with_result < 0.8 * examples, (with_result, examples)
