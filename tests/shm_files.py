"""/dev/shm files and the live processes that hold them: one home for the tests' leak checks
(tests/system/test_vllm_serve.py) and the session's clean-up of the files MPICH leaves for jobs
the tests kill (tests/conftest.py). No MPI here: conftest imports it in every pytest process."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

SHM = Path("/dev/shm")


def shm_of(pids) -> set[str]:
    """Names of /dev/shm files the processes ``pids`` have mapped or open (all, when ``None``),
    not counting unlinked ones."""
    names = set()
    for pid in pids if pids is not None else (p.name for p in Path("/proc").glob("[0-9]*")):
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/maps").read_text()
            names.update(
                n for n, gone in re.findall(r"/dev/shm/(\S+)( \(deleted\))?", text) if not gone
            )
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("/dev/shm/") and not target.endswith("(deleted)"):
                        names.add(target[len("/dev/shm/") :])
    return names


def mpich_segments() -> set[str]:
    """Names of MPICH's shared-memory files in /dev/shm (``mpich_shm_*``)."""
    return {p.name for p in SHM.glob("mpich_shm_*")} if SHM.is_dir() else set()


def stale_segments(before: set[str]) -> set[str]:
    """MPICH's files in /dev/shm that were not there ``before`` and that no live process maps or
    holds open: what killed jobs left behind. (A job holds its file open from its creation until
    it is mapped, so a job that is starting is never in this set.)"""
    return (mpich_segments() - before) - shm_of(None)
