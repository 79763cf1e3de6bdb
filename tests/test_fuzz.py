"""Fuzzing (hypothesis) on 3 ranks: every call returns the reference result or raises the
documented error on every rank. ``MPICOMM_FUZZ_EXAMPLES`` (default 300) sets the number of cases.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
EXAMPLES = int(os.environ.get("MPICOMM_FUZZ_EXAMPLES", 300))


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
@pytest.mark.timeout(150 + EXAMPLES // 2)
def test_fuzz_three_ranks():
    bound = 120 + EXAMPLES // 2
    environ = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPICOMM_TIMEOUT="30")
    environ.pop("MPICOMM_VALIDATE", None)
    command = ["timeout", "-k", "5", str(bound), MPIEXEC, "-n", "3", sys.executable]
    command += [str(ROOT / "tests" / "faults" / "fuzz.py"), str(EXAMPLES)]
    proc = subprocess.run(command, env=environ, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 124, f"the fuzz run hung:\n{output[-4000:]}"
    match = re.search(r"FUZZ examples=(\d+) with_result=(\d+) status=(\d+)", proc.stdout)
    assert match, f"no summary (exit {proc.returncode}):\n{output[-4000:]}"
    examples, with_result, status = map(int, match.groups())
    assert status == 0 and proc.returncode == 0, output[-6000:]
    assert examples == EXAMPLES
    # both halves of the property were exercised: results checked, and errors checked
    assert 0.2 * examples < with_result < 0.8 * examples, (with_result, examples)
