"""``python -m mpicomm info`` and ``check`` as a user runs them, under mpiexec (without it:
tests/unit/test_cli.py)."""

import pytest

from tests.helpers import run_mpi


def run(n, *args, env=None, timeout=240):
    return run_mpi(n, *args, env=env, timeout=timeout)


@pytest.mark.parametrize("n", [2, 3])
def test_check_passes_and_prints_table(n):
    proc = run(n, "-m", "mpicomm", "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"mpicomm check on {n} rank(s)" in proc.stdout
    assert "FAIL" not in proc.stdout
    for name in ("all_reduce", "reduce_scatterv", "dispatch/combine", "bf16", "f8e5m2"):
        assert name in proc.stdout
    assert "check: 126 passed, 0 failed" in proc.stdout


def test_check_on_the_staging_path_with_validation_and_timeout():
    env = {"MPICOMM_VALIDATE": "1", "MPICOMM_TIMEOUT": "60", "MPICOMM_ALLREDUCE_ALGO": "bytes"}
    proc = run(2, "-m", "mpicomm", "check", "--staging", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failed" in proc.stdout


def test_check_fails_when_a_collective_is_wrong(tmp_path):
    # A deliberately broken communicator must turn cells red and the exit status non-zero.
    script = tmp_path / "broken.py"
    script.write_text(
        "import sys, torch\n"
        "import mpicomm.communicator as c\n"
        "orig = c.MPICommunicator.all_gather\n"
        "c.MPICommunicator.all_gather = lambda self, x, dim=-1: orig(self, x, dim) + 0 "
        "if x.dtype == torch.float32 else orig(self, x, dim).flip(0)\n"
        "from mpicomm.cli import main\n"
        "sys.exit(main(['check']))\n"
    )
    proc = run(2, str(script))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "0 failed" not in proc.stdout


def test_info_reports_library_cuda_awareness_and_placement():
    proc = run(2, "-m", "mpicomm", "info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "MPI library" in out and "thread level" in out
    assert "CUDA-aware MPI   no" in out and "staged through pinned host memory" in out
    assert "ranks            2 on 1 node(s)" in out
    assert "huge pages       on for host results >= 4 MiB" in out
    assert "large results    recycled storages for host results >= 4 MiB" in out
    assert out.count(" cpu") >= 2


def test_info_honours_cuda_aware_override():
    env = {"MPICOMM_CUDA_AWARE": "1", "MPICOMM_HUGE_PAGES": "0", "MPICOMM_RECYCLE": "0"}
    proc = run(1, "-m", "mpicomm", "info", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA-aware MPI   yes" in proc.stdout and "MPICOMM_CUDA_AWARE=1" in proc.stdout
    assert "huge pages       off (MPICOMM_HUGE_PAGES=0)" in proc.stdout
    assert "large results    new memory every time (MPICOMM_RECYCLE=0)" in proc.stdout


def test_info_names_a_malformed_setting_and_reports_the_rest():
    env = {"MPICOMM_RECYCLE": "maybe", "MPICOMM_HUGE_PAGES": "2", "MPICOMM_SHM_DIRECT": "x"}
    proc = run(1, "-m", "mpicomm", "info", env=env)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    spellings = "must be 0 or 1 (or true/yes/on, false/no/off), got"
    assert f"large results    unknown: MPICOMM_RECYCLE {spellings} 'maybe'" in out
    assert f"huge pages       unknown: MPICOMM_HUGE_PAGES {spellings} '2'" in out
    assert "unknown: MPICOMM_SHM_DIRECT must be 0 or 1" in out and "ranks            1" in out
