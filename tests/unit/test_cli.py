"""``python -m mpicomm check`` as a user runs it without mpiexec (under mpiexec:
tests/jobs/test_cli.py)."""

import subprocess
import sys


def test_single_process_without_mpiexec():
    proc = subprocess.run(
        [sys.executable, "-m", "mpicomm", "check"], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 1 rank(s)" in proc.stdout
