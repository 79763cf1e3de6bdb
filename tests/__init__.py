"""mpicomm's tests.

``unit/``: one process, a file per mpicomm module; ``mpi/``: run on every rank of an mpiexec
job; ``programs/``: scripts the tests start under mpiexec; ``system/``: need a real Slurm,
(simulated) hosts or vLLM. ``helpers.py`` and ``conformance.py`` are shared by all of them.
"""
