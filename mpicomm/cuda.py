"""Whether the loaded MPI library can take CUDA device pointers.

mpi4py cannot ask; both MPICH and Open MPI export ``MPIX_Query_cuda_support()``, which we call with
ctypes on the libmpi that mpi4py loaded. ``MPICOMM_CUDA_AWARE=0|1`` overrides the answer for
libraries that answer wrongly.
"""

from __future__ import annotations

import ctypes
import functools
import os

from mpi4py import MPI

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


@functools.cache
def library_cuda_support() -> bool | None:
    """The library's own answer to ``MPIX_Query_cuda_support()``; ``None`` if it has no such call."""
    candidates = [None]
    path = loaded_libmpi()
    if path is not None:
        candidates.append(path)
    for name in candidates:
        try:
            query = ctypes.CDLL(name).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        query.argtypes = []
        return bool(query())
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
