"""mpicomm's tests.

``unit/``: one process, a file per mpicomm module; ``jobs/``: tests that each start their own
mpiexec job, in files named like those of ``unit/``; ``mpi/``: run on every rank of an mpiexec
job; ``programs/``: scripts the tests start under mpiexec; ``system/``: need a real Slurm,
(simulated) hosts or vLLM. ``helpers.py``, ``conformance.py`` and ``minilm_cases.py`` are shared.
"""
