"""One-process tests, one file per mpicomm module (some start tests/programs/ under mpiexec)."""
