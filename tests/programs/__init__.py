"""Programs that tests start under mpiexec (not collected by pytest)."""
