"""MoE routing under mpiexec at W = 1..4 (in one process: tests/unit/test_moe.py).

Runs ``tests/programs/all2all_check.py`` (which then runs ``examples/moe_layer.py``) under
``timeout 150 mpiexec -n W``; a mismatch on any rank aborts the job.
"""

from __future__ import annotations

import pytest

from tests.helpers import run_mpi


def _mpiexec(ranks: int, *argv: str, limit: int = 150) -> str:
    proc = run_mpi(ranks, *argv, timeout=limit)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}:\n{output[-4000:]}"
    )
    return output


@pytest.mark.timeout(200)
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_routers_and_moe_layer_under_mpiexec(ranks):
    """tests/programs/all2all_check.py, then examples/moe_layer.py (both backends, fp32, bf16)."""
    out = _mpiexec(ranks, "tests/programs/all2all_check.py")
    assert out.count("ALL2ALL OK") == ranks
    assert out.count("MOE LAYER OK") == 4 * ranks  # 2 backends x 2 dtypes per rank
