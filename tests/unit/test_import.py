"""Importing mpicomm never starts MPI (docs/contract.md, "Import").

A child process of an MPI rank cannot start MPI (it inherits the launcher's variables, not its
connection), and vLLM imports every platform plugin in such children. Each module is imported in a
fresh interpreter (one for all, in the package's order) that refuses to load ``mpi4py.MPI``: a
module that needs MPI at import fails here, naming itself.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import subprocess
import sys

import mpicomm
from tests.helpers import child_env

# Modules that import vLLM at module level (the platform classes and the vLLM-side communicator).
NEEDS_VLLM = {"mpicomm.vllm.platform", "mpicomm.vllm.platform_cuda", "mpicomm.vllm.communicator"}

REFUSE_MPI = """
import importlib, sys
current = None
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "mpi4py.MPI":
            raise ImportError("mpi4py.MPI imported while importing " + current)
sys.meta_path.insert(0, Refuse())
for current in sys.argv[1:]:
    importlib.import_module(current)
"""


def _modules() -> list[str]:
    names = ["mpicomm"]
    for info in pkgutil.walk_packages(mpicomm.__path__, "mpicomm."):
        if info.name.endswith("__main__"):
            continue
        if info.name in NEEDS_VLLM and importlib.util.find_spec("vllm") is None:
            continue
        names.append(info.name)
    return names


def test_import_does_not_start_mpi():
    proc = subprocess.run(
        [sys.executable, "-c", REFUSE_MPI, *_modules()],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_refusal_can_fail():
    """The check itself notices a module that starts MPI at import."""
    proc = subprocess.run(
        [sys.executable, "-c", REFUSE_MPI, "mpi4py.MPI"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "mpi4py.MPI imported" in proc.stderr
