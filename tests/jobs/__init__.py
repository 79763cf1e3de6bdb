"""Tests that each start their own job under mpiexec (tests/helpers.py ``run_mpi``), run by
the single-process pytest step."""
