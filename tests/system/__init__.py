"""Tests that need a real system: Slurm, (simulated) hosts, vLLM; skipped without one."""
