"""One-process tests, one file per mpicomm module; none starts mpiexec (conftest.py fails a test
that does: such tests go to tests/jobs/)."""
