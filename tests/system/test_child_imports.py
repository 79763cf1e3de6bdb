"""A child process of an MPI rank may import mpicomm (docs/contract.md, "Import").

Under mpiexec each rank starts MPI, then imports ``mpicomm``, ``mpicomm.distributed``,
``mpicomm.vllm`` (calling its entry point ``register()`` with ``MPICOMM_VLLM=1``) and, where vLLM
is installed, the platform module it names, each in a child process with the rank's environment
(the launcher's PMI variables included), as vLLM's model inspection and engine core do. A module
that starts MPI at import makes its child abort (``PMI_Init returned -1``).
"""

from __future__ import annotations

import importlib.util

from tests.helpers import PROGRAMS, run_reporting

MODULES = ["mpicomm", "mpicomm.distributed", "mpicomm.vllm", "mpicomm.vllm.platform"]


def test_children_of_ranks_import_mpicomm():
    out = run_reporting(
        2,
        PROGRAMS / "child_imports.py",
        *MODULES,
        marker="CHILD_IMPORTS_OK",
        timeout=600,
        env={"MPICOMM_VLLM": None},
    )
    expected = MODULES if importlib.util.find_spec("vllm") else MODULES[:-1]
    for rank in (0, 1):
        for name in expected:
            assert f"rank {rank}: child importing {name}: exit 0" in out, out[-3000:]
