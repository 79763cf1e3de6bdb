"""``python -m mpicomm bench``: an nccl-tests style sweep of mpicomm against raw mpi4py and gloo.

Run it under MPI, e.g. ``timeout 300 mpiexec -n 2 python -m mpicomm bench --quick``. See
``docs/benchmarks.md`` for the options, the figures measured on the project machine and how to
read them. Needs the ``bench`` extra (matplotlib for the plots, tqdm for the progress bar).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with command-line ``argv`` (default ``sys.argv[1:]``); the exit status."""
    from .harness import main as _main

    return _main(argv)


__all__ = ["main"]
