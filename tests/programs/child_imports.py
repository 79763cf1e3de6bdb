"""Every rank starts MPI, then imports mpicomm's vLLM-facing modules in CHILD processes.

A child of a rank inherits the launcher's variables (PMI_*, HYDRA_*, ...) but not its
connection, so a child that starts MPI aborts (docs/contract.md, "Import"). vLLM starts such
children (its model inspection, its engine core) and each one imports every platform plugin:
``mpicomm.vllm`` with ``register()`` called under ``MPICOMM_VLLM=1``, the platform module it
names, ``mpicomm`` and ``mpicomm.distributed``. Each module is imported in its own child with
this rank's environment; the rank prints ``CHILD_IMPORTS_OK rank=R`` when every child exited 0.

    mpiexec -n 2 python tests/programs/child_imports.py [module ...]
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from mpi4py import MPI

DEFAULT = ["mpicomm", "mpicomm.distributed", "mpicomm.vllm", "mpicomm.vllm.platform"]

CHILD = """
import importlib, importlib.util, sys
name = sys.argv[1]
module = importlib.import_module(name)
if name == "mpicomm.vllm":  # what vLLM does with the entry point, then with its answer
    platform = module.register()
    assert platform == module.CPU_PLATFORM, platform
    if importlib.util.find_spec("vllm") is not None:
        importlib.import_module(platform.rpartition(".")[0])
"""


def main(argv: list[str]) -> int:
    rank = MPI.COMM_WORLD.Get_rank()  # MPI is running in this rank, as in a launched vLLM rank
    names = argv or DEFAULT
    if importlib.util.find_spec("vllm") is None:  # the platform module imports vLLM
        names = [n for n in names if n != "mpicomm.vllm.platform"]
    env = dict(os.environ, MPICOMM_VLLM="1", MPICOMM_VLLM_DEVICE="cpu")
    failed = []
    for name in names:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, name],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        print(f"rank {rank}: child importing {name}: exit {proc.returncode}", flush=True)
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stdout[-1500:], proc.stderr[-1500:], file=sys.stderr, flush=True)
    ok = MPI.COMM_WORLD.allreduce(int(not failed), op=MPI.MIN)
    if not failed:
        print(f"CHILD_IMPORTS_OK rank={rank}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
