"""Whether the loaded MPI library can take CUDA device pointers.

mpi4py cannot ask; both MPICH and Open MPI export ``MPIX_Query_cuda_support()`` (MPICH also
``MPIX_GPU_query_support``, asked first), which we call with ctypes on the libmpi that mpi4py
loaded. ``MPICOMM_CUDA_AWARE=0|1`` overrides the answer for libraries that answer wrongly.
"""

from __future__ import annotations

import ctypes
import functools
import os

from ._mpi import MPI
from .config import settings


@functools.cache
def loaded_libmpi() -> str | None:
    """Path of the libmpi shared library in this process, or ``None`` if it cannot be found."""
    MPI.Get_library_version()  # make sure the library is loaded
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(("libmpi.", "libmpi_")):
            return path
    return min(paths) if paths else None


_MPIX_GPU_SUPPORT_CUDA = 0  # MPICH's mpi.h


def ask_library(lib: ctypes.CDLL) -> bool | None:
    """``lib``'s answer: MPICH's ``MPIX_GPU_query_support(CUDA)`` where exported, else
    ``MPIX_Query_cuda_support()`` (Open MPI, MVAPICH); ``None`` if it has neither.

    MPICH's ``MPIX_Query_cuda_support`` wraps the GPU query in an ``assert`` that aborts the
    process in MPICH < 4 built without GPU support (e.g. MPICH 3.4-based Cray MPICH), so the GPU
    query is asked first.
    """
    gpu_query = getattr(lib, "MPIX_GPU_query_support", None)
    if gpu_query is not None:
        gpu_query.restype = ctypes.c_int
        gpu_query.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        flag = ctypes.c_int(0)
        if gpu_query(_MPIX_GPU_SUPPORT_CUDA, ctypes.byref(flag)) == 0:
            return bool(flag.value)
    query = getattr(lib, "MPIX_Query_cuda_support", None)
    if query is None:
        return None
    query.restype = ctypes.c_int
    query.argtypes = []
    return bool(query())


@functools.cache
def library_cuda_support() -> bool | None:
    """The loaded MPI library's own answer (:func:`ask_library`); ``None`` if it cannot say."""
    candidates = [None]
    path = loaded_libmpi()
    if path is not None:
        candidates.append(path)
    for name in candidates:
        try:
            answer = ask_library(ctypes.CDLL(name))
        except OSError:
            continue
        if answer is not None:
            return answer
    return None


def cuda_aware() -> bool:
    """True when device buffers may be handed to MPI directly (override: MPICOMM_CUDA_AWARE)."""
    override = settings().cuda_aware
    if override is not None:
        return override
    return bool(library_cuda_support())


def cuda_awareness_report() -> str:
    """One line for ``python -m mpicomm info``: the answer, where it came from, the path used."""
    override = settings().cuda_aware
    answer = library_cuda_support()
    source = {None: "library has no MPIX_Query_cuda_support", True: "library says yes"}
    source[False] = "library says no"
    aware = cuda_aware()
    path = "direct (device buffers to MPI)" if aware else "staged through pinned host memory"
    text = f"{'yes' if aware else 'no'} ({source[answer]}"
    if override is not None:
        text += f"; overridden by MPICOMM_CUDA_AWARE={int(override)}"
    return text + f"); CUDA tensors: {path}"
