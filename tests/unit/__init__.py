"""One-process tests, one file per mpicomm module. (Some files still start tests/programs/ under
mpiexec; the tests that do so are moving to tests/jobs/.)"""
