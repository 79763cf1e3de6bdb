"""The slurm/ scripts on a real Slurm cluster: submitted with sbatch and srun, checked by exit status
and job output.

Skips with the reason when Slurm is not installed or not running; bring up a one-node cluster with
``sudo bash tests/system/slurm/cluster.sh install && sudo bash tests/system/slurm/cluster.sh up``. With
``MPICOMM_REQUIRE_SLURM=1`` (as .ci/slurm.sh sets) a missing cluster fails instead of skipping.
Every wait is bounded: a job that does not end in time is cancelled and the test fails.

The job's python is this test's interpreter: its directory goes first on the job's PATH, so
``python`` in the job is the project's venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpicomm import launch
from tests.helpers import PROGRAMS, ROOT

# These tests start their own mpiexec/srun/sbatch and assume a one-process pytest.
pytestmark = pytest.mark.skipif(
    launch.env_ranks().world_size not in (None, 1),
    reason="pytest itself runs under an MPI launcher; run this file with plain pytest",
)
RUN = ROOT / "slurm" / "run.sbatch"
JOB = PROGRAMS / "job.py"
JOB_LIMIT = 150  # seconds a job may take from submission to its end


def _slurm_problem() -> str | None:
    if os.environ.get("MPICOMM_SLURM_TESTS") == "0":
        return "MPICOMM_SLURM_TESTS=0"
    for tool in ("sbatch", "srun", "squeue", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return (
                f"Slurm is not installed ({tool} not on PATH): "
                "run `sudo bash tests/system/slurm/cluster.sh install && sudo bash tests/system/slurm/cluster.sh up`"
            )
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not Path(conf).exists():
        return (
            f"Slurm is not configured (no {conf}): run `sudo bash tests/system/slurm/cluster.sh up`"
        )
    try:
        ping = subprocess.run(
            ["timeout", "10", "scontrol", "ping"], capture_output=True, text=True, check=False
        )
        states = subprocess.run(
            ["timeout", "10", "sinfo", "-h", "-o", "%T"], capture_output=True, text=True
        ).stdout.split()
    except OSError as exc:
        return f"Slurm does not answer: {exc}"
    if "UP" not in ping.stdout:
        said = (ping.stdout.strip() or ping.stderr.strip() or "no answer").splitlines()[-1]
        return (
            f"slurmctld is not running (`scontrol ping`: {said[:200]}): "
            "run `sudo bash tests/system/slurm/cluster.sh up`"
        )
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable Slurm node (sinfo states: {states}): run `sudo bash tests/system/slurm/cluster.sh up`"
    return None


_PROBLEM = _slurm_problem()
if _PROBLEM and os.environ.get("MPICOMM_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"MPICOMM_REQUIRE_SLURM=1 but {_PROBLEM}")
needs_slurm = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def _job_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "OMPI_", "MPICOMM_"))
    }
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


CHECK = ["python", "-m", "mpicomm", "check"]


def _assert_check_passed(out: str, ntasks: int) -> None:
    """The check's table is in the output and every cell passed."""
    assert f"mpicomm check on {ntasks} rank(s)" in out, out
    counts = re.search(r"check: (\d+) passed, (\d+) failed", out)
    assert counts and int(counts[1]) > 0 and counts[2] == "0", out
    assert "FAIL" not in out, out


def _scontrol(jobid: str) -> dict[str, str]:
    text = subprocess.run(
        ["timeout", "10", "scontrol", "show", "job", "-o", jobid], capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def sbatch(tmp_path: Path, args: list[str], command: list[str], script: Path = RUN, **env: str):
    """Submit a script, wait (bounded) for the job to leave the queue; return its record."""
    out = tmp_path / "job.out"
    sub = subprocess.run(
        ["timeout", "30", "sbatch", "--parsable", "-o", str(out), "-D", str(ROOT), *args]
        + [str(script), *command],
        env=_job_env(**env),
        capture_output=True,
        text=True,
    )
    assert sub.returncode == 0, f"sbatch failed: {sub.stderr}"
    jobid = sub.stdout.strip().split(";")[0]
    start = time.monotonic()
    while time.monotonic() - start < JOB_LIMIT:
        queued = subprocess.run(
            ["timeout", "10", "squeue", "-h", "-j", jobid, "-o", "%T"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if not queued or queued in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.3)
    else:
        subprocess.run(["timeout", "10", "scancel", jobid], check=False)
        pytest.fail(f"job {jobid} still queued/running after {JOB_LIMIT} s; cancelled")
    elapsed = time.monotonic() - start
    record = _scontrol(jobid)
    text = out.read_text() if out.exists() else ""
    return record.get("JobState"), record.get("ExitCode"), text, elapsed


def srun(args: list[str], command: list[str], **env: str):
    start = time.monotonic()
    proc = subprocess.run(
        ["timeout", "-k", "10", str(JOB_LIMIT), "srun", "--kill-on-bad-exit=1", *args, *command],
        env=_job_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


# --- sbatch slurm/run.sbatch -----------------------------------------------------------------


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
@pytest.mark.parametrize(
    ("ntasks", "launcher", "shown"),
    [
        (2, "auto", "srun --kill-on-bad-exit=1 --mpi=pmi2"),
        (4, "auto", "srun --kill-on-bad-exit=1 --mpi=pmi2"),
    ],
)
def test_sbatch_check(tmp_path, ntasks, launcher, shown):
    state, code, out, _ = sbatch(tmp_path, ["-n", str(ntasks)], CHECK, MPICOMM_LAUNCHER=launcher)
    assert (state, code) == ("COMPLETED", "0:0"), out
    assert f"tasks: {ntasks}" in out and shown in out, out
    assert "== MPI: " in out and "== exit status: 0" in out, out
    _assert_check_passed(out, ntasks)


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
def test_sbatch_mpiexec_launcher(tmp_path):
    # The MPI's own mpiexec inside the allocation (hydra starts its proxies with srun).
    cmd = ["python", str(JOB), "ok"]
    state, code, out, _ = sbatch(tmp_path, ["-n", "3"], cmd, MPICOMM_LAUNCHER="mpiexec")
    assert (state, code) == ("COMPLETED", "0:0"), out
    assert re.search(r"== launcher: \S*mpiexec -n 3", out), out
    found = sorted(re.findall(r"job\.py rank \d/3 local \d/3 env=hydra sum=3 PASS", out))
    assert found == [f"job.py rank {r}/3 local {r}/3 env=hydra sum=3 PASS" for r in range(3)], out


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
def test_ready_made_check_sbatch(tmp_path):
    # As a user runs it: its own #SBATCH options (1 node, 2 tasks), run.sbatch found next to it.
    state, code, out, _ = sbatch(tmp_path, [], [], script=ROOT / "slurm" / "check.sbatch")
    assert (state, code) == ("COMPLETED", "0:0"), out
    assert "== command: python -m mpicomm check" in out, out
    _assert_check_passed(out, 2)


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
@pytest.mark.parametrize(("launcher", "mode"), [("auto", "raise"), ("mpiexec", "thread")])
def test_sbatch_failing_task_fails_job(tmp_path, launcher, mode):
    state, code, out, elapsed = sbatch(
        tmp_path, ["-n", "2"], ["python", str(JOB), mode], MPICOMM_LAUNCHER=launcher
    )
    assert state == "FAILED" and code != "0:0", (state, code, out)
    # A hang would run into JOB_LIMIT; the bound leaves room for slow imports on a busy machine.
    assert elapsed < 100, f"the failing job took {elapsed:.0f} s\n{out}"
    assert "[rank 1] RuntimeError: deliberate failure in tests/programs/job.py" in out, out
    assert re.search(r"== exit status: [1-9]", out), out


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
def test_sbatch_gpu_binding_threads_and_settings(tmp_path):
    # No GPUs here: a fake CUDA_VISIBLE_DEVICES list checks the per-task binding by local rank.
    task = "TASK $SLURM_PROCID gpu=$CUDA_VISIBLE_DEVICES omp=$OMP_NUM_THREADS mpich=$MPIR_CVAR_ENABLE_GPU"
    state, code, out, _ = sbatch(
        tmp_path,
        ["-n", "2", "-c", "2"],
        ["bash", "-c", f'echo "{task}"'],
        CUDA_VISIBLE_DEVICES="3,5",
        MPICOMM_CUDA_AWARE="1",
        MPICOMM_SRUN_ARGS="--label --cpu-bind=none",
    )
    assert (state, code) == ("COMPLETED", "0:0"), out
    assert sorted(re.findall(r"TASK \d gpu=\S* omp=\d+ mpich=\S*", out)) == [
        "TASK 0 gpu=3 omp=2 mpich=1",
        "TASK 1 gpu=5 omp=2 mpich=1",
    ], out
    assert re.search(r"^0: TASK 0", out, re.M), out  # srun --label took effect
    assert "--mpi=pmi2 --label --cpu-bind=none" in out, out
    assert "threads/rank: 2" in out and "one per task" in out, out
    assert "CUDA-aware: 1 (MPIR_CVAR_ENABLE_GPU=1)" in out, out


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
def test_sbatch_rejects_unknown_launcher(tmp_path):
    state, code, out, _ = sbatch(tmp_path, ["-n", "1"], ["true"], MPICOMM_LAUNCHER="bogus")
    assert (state, code) == ("FAILED", "2:0"), out
    assert "MPICOMM_LAUNCHER=bogus" in out


# --- srun directly -----------------------------------------------------------------------------


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
def test_srun_check():
    rc, out, _ = srun(["-n", "2", "--mpi=pmi2"], CHECK)
    assert rc == 0, out
    _assert_check_passed(out, 2)


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 60)
def test_srun_failing_task():
    rc, out, elapsed = srun(["-n", "2", "--mpi=pmi2"], ["python", str(JOB), "raise"])
    assert rc != 0, out  # srun's own status (137: it killed the waiting task), not timeout's
    assert elapsed < 100, f"took {elapsed:.0f} s\n{out}"
    assert "[rank 1] RuntimeError: deliberate failure" in out, out


# --- shellcheck (needs shellcheck, not Slurm) ----------------------------------------------------


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(ROOT.glob("slurm/*.sbatch")) + sorted(ROOT.glob("tests/system/slurm/*.sh"))
    scripts += [p for p in [ROOT / ".ci" / "slurm.sh"] if p.exists()]
    assert scripts
    proc = subprocess.run(
        ["timeout", "60", "shellcheck", "--shell=bash", *map(str, scripts)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
