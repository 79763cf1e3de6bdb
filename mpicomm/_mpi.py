"""``MPI``: mpi4py's ``MPI`` module, imported on first use instead of at import.

``from mpi4py import MPI`` starts MPI (``MPI_Init``). A child process of an MPI rank (vLLM's
model inspection, its engine core) inherits the launcher's variables but not its connection, and
``MPI_Init`` there aborts the child; such children import every ``vllm.platform_plugins`` entry
point, so importing mpicomm must not start MPI (docs/contract.md, "Import"). Every module of the
package takes ``MPI`` from here: the first attribute read (``MPI.COMM_WORLD``, ``MPI.SUM``, ...)
imports mpi4py's module, and each attribute is then cached on the proxy, so later reads cost
what a module attribute costs.
"""

from __future__ import annotations

import sys
from typing import Any


class _LazyMPI:
    """Stands for ``mpi4py.MPI``; imports it when an attribute is first read."""

    __slots__ = ("__dict__",)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        from mpi4py import MPI as module

        value = getattr(module, name)
        setattr(self, name, value)
        return value

    def __repr__(self) -> str:
        state = "imported" if started() else "not imported yet"
        return f"<lazy mpi4py.MPI ({state})>"


def started() -> bool:
    """True once ``mpi4py.MPI`` has been imported (by mpicomm or anyone else) in this process."""
    return "mpi4py.MPI" in sys.modules


MPI: Any = _LazyMPI()
