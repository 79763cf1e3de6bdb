"""The mpicomm torch.distributed backend against gloo on the same inputs (3 ranks).

tests/programs/dist_ops.py runs every operation once under gloo and once under mpicomm; every case
gloo supports must give the same result (integers, movement and min/max bit for bit; float sums and
products to their rounding, since the summation order differs), and mpicomm must support every case.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import PROGRAMS, run_mpi

RANKS = 3


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for backend in ("gloo", "mpicomm"):
        prefix = tmp_path_factory.mktemp(backend) / "ops"
        proc = run_mpi(RANKS, str(PROGRAMS / "dist_ops.py"), backend, str(prefix), timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[backend] = [torch.load(f"{prefix}.rank{r}.pt") for r in range(RANKS)]
    return out


def _tolerance(name: str) -> tuple[float, float]:
    if "bfloat16" in name:
        return 1e-2, 2e-2  # gloo rounds to bf16 after every addition, mpicomm once
    if "float" in name:
        return 1e-5, 1e-6
    return 0.0, 0.0


def test_mpicomm_supports_every_case(results):
    unsupported = {k: v for k, v in results["mpicomm"][0].items() if isinstance(v, str)}
    assert not unsupported


def test_same_results_as_gloo_where_gloo_supports_the_case(results):
    compared = 0
    for rank in range(RANKS):
        gloo, mine = results["gloo"][rank], results["mpicomm"][rank]
        assert gloo.keys() == mine.keys()
        for name, expected in gloo.items():
            if isinstance(expected, str):
                continue
            got = mine[name]
            rtol, atol = _tolerance(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            if rtol == 0:
                assert torch.equal(got, expected), name
            else:
                assert torch.allclose(got.double(), expected.double(), rtol=rtol, atol=atol), name
            compared += 1
    assert compared >= RANKS * 30  # gloo supports nearly every case: the comparison is real
