"""What ``python -m mpicomm info`` reports about CUDA-aware MPI under mpiexec (in one process:
tests/unit/test_cuda_detect.py). No GPU needed."""

from __future__ import annotations

from tests.helpers import mpicomm_info, report_line


def test_info_under_mpiexec_reports_once():
    text = mpicomm_info({}, ranks=2)
    assert report_line(text, "CUDA-aware MPI").startswith(("yes", "no"))
    assert report_line(text, "ranks") == "2 on 1 node(s)"
