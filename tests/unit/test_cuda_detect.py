"""Detection of CUDA-aware MPI: the library's own answer, the MPICOMM_CUDA_AWARE override, and what
``python -m mpicomm info`` reports in one process (under mpiexec: tests/jobs/test_cuda_detect.py).
No GPU needed.

    python -m pytest tests/unit/test_cuda_detect.py
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch
from mpi4py import MPI

from mpicomm import MPICommunicator, cuda
from tests.helpers import mpicomm_info, report_line


@pytest.fixture
def library_says(monkeypatch):
    """Pretend the library answers ``value`` (``None``: it has no MPIX_Query_cuda_support)."""

    def set_answer(value):
        monkeypatch.setattr(cuda, "library_cuda_support", lambda: value)

    monkeypatch.delenv("MPICOMM_CUDA_AWARE", raising=False)
    return set_answer


@pytest.mark.parametrize(
    ("answer", "aware", "source"),
    [
        (True, True, "library says yes"),
        (False, False, "library says no"),
        (None, False, "library has no MPIX_Query_cuda_support"),
    ],
)
def test_library_answer_without_override(library_says, answer, aware, source):
    library_says(answer)
    assert cuda.cuda_aware() is aware
    report = cuda.cuda_awareness_report()
    assert report.startswith(("yes" if aware else "no") + f" ({source})")
    path = "direct (device buffers to MPI)" if aware else "staged through pinned host memory"
    assert report.endswith(f"CUDA tensors: {path}")
    assert "overridden" not in report


@pytest.mark.parametrize("answer", [True, False, None])
@pytest.mark.parametrize("override", ["0", "1", "no", "yes"])
def test_override_wins_both_ways(library_says, monkeypatch, answer, override):
    library_says(answer)
    monkeypatch.setenv("MPICOMM_CUDA_AWARE", override)
    aware = override in ("1", "yes")
    assert cuda.cuda_aware() is aware
    report = cuda.cuda_awareness_report()
    assert report.startswith("yes" if aware else "no")
    assert f"overridden by MPICOMM_CUDA_AWARE={int(aware)}" in report
    assert ("direct" in report) is aware


def test_communicator_takes_the_answer_at_creation(library_says, monkeypatch):
    """The communicator decides its path once, when it is made."""
    library_says(False)
    monkeypatch.setenv("MPICOMM_CUDA_AWARE", "1")
    aware = MPICommunicator(MPI.COMM_WORLD)
    monkeypatch.setenv("MPICOMM_CUDA_AWARE", "0")
    staged = MPICommunicator(MPI.COMM_WORLD)
    try:
        assert aware.cuda_aware and not staged.cuda_aware
        # CUDA tensors are staged exactly when MPI is not CUDA-aware; CPU tensors never are.
        cuda_dev, cpu_dev = torch.device("cuda", 0), torch.device("cpu")
        assert staged.staged(cuda_dev) and not aware.staged(cuda_dev)
        assert not staged.staged(cpu_dev) and not aware.staged(cpu_dev)
    finally:
        staged.destroy()
        aware.destroy()


def test_malformed_override_is_refused(monkeypatch):
    monkeypatch.setenv("MPICOMM_CUDA_AWARE", "maybe")
    with pytest.raises(ValueError, match="MPICOMM_CUDA_AWARE"):
        cuda.cuda_aware()
    with pytest.raises(ValueError, match="MPICOMM_CUDA_AWARE"):
        MPICommunicator(MPI.COMM_WORLD)


def test_loaded_libmpi_is_the_library_in_use():
    path = cuda.loaded_libmpi()
    assert path is not None and os.path.isfile(path)
    assert os.path.basename(path).startswith("libmpi")


def _pypi_mpich() -> bool:
    """The wheel names itself in its version text: 'MPICH Custom Information: .../pypi.org/p/mpich'."""
    return "pypi.org/p/mpich" in MPI.Get_library_version()


@pytest.mark.skipif(not _pypi_mpich(), reason="the MPI in use is not the PyPI mpich wheel")
def test_pypi_mpich_answers_no():
    """The mpich wheel exports MPIX_Query_cuda_support (so the answer is not None) and says 0."""
    assert cuda.library_cuda_support() is False


@pytest.fixture
def single_process():
    if MPI.COMM_WORLD.Get_size() > 1:
        pytest.skip("starts its own MPI processes: run in a single-process pytest")


def test_info_reports_the_answer_and_path(single_process):
    text = mpicomm_info({})
    answer = cuda.library_cuda_support()
    line = report_line(text, "CUDA-aware MPI")
    if answer:
        assert line == "yes (library says yes); CUDA tensors: direct (device buffers to MPI)"
    else:
        source = "library says no" if answer is False else "library has no MPIX_Query_cuda_support"
        assert line == f"no ({source}); CUDA tensors: staged through pinned host memory"
    assert report_line(text, "libmpi") == cuda.loaded_libmpi()


@pytest.mark.parametrize("override", ["0", "1"])
def test_info_reports_the_override(single_process, override):
    line = report_line(mpicomm_info({"MPICOMM_CUDA_AWARE": override}), "CUDA-aware MPI")
    assert line.startswith("yes" if override == "1" else "no")
    assert f"overridden by MPICOMM_CUDA_AWARE={override}" in line
    path = "direct (device buffers to MPI)" if override == "1" else "staged through pinned host"
    assert path in line


_FAKES = {
    # MPICH >= 3.4 built without GPU support: its MPIX_Query_cuda_support may assert (abort).
    "mpich_no_gpu": """
        #include <stdlib.h>
        int MPIX_GPU_query_support(int type, int *ok) { *ok = 0; return 0; }
        int MPIX_Query_cuda_support(void) { abort(); }
    """,
    "mpich_cuda": """
        int MPIX_GPU_query_support(int type, int *ok) { *ok = (type == 0); return 0; }
        int MPIX_Query_cuda_support(void) { return 1; }
    """,
    "openmpi_cuda": "int MPIX_Query_cuda_support(void) { return 1; }",
    "openmpi_plain": "int MPIX_Query_cuda_support(void) { return 0; }",
    "no_query": "int MPI_Init(int *argc, char ***argv) { return 0; }",
}


@pytest.mark.parametrize(
    ("fake", "answer"),
    [
        ("mpich_no_gpu", False),
        ("mpich_cuda", True),
        ("openmpi_cuda", True),
        ("openmpi_plain", False),
        ("no_query", None),
    ],
)
def test_ask_library_on_fake_libraries(tmp_path, fake, answer):
    """The query order: MPICH's GPU query first (its MPIX_Query_cuda_support can abort), then
    MPIX_Query_cuda_support, else no answer."""
    import ctypes

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fake libraries")
    src, lib = tmp_path / f"{fake}.c", tmp_path / f"lib{fake}.so"
    src.write_text(_FAKES[fake])
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=60)
    assert cuda.ask_library(ctypes.CDLL(str(lib))) is answer
