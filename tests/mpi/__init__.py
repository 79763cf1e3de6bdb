"""Tests run on every rank: mpiexec -n N python -m pytest --with-mpi tests/mpi."""
