"""The tensor-parallel MiniLM example across MPI ranks: ``timeout 300 mpiexec -n N python
examples/tp_inference.py`` in a subprocess (in one process: tests/unit/test_tp_inference.py).
Needs the ``examples`` extra (tests/minilm_cases.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_mpi
from tests.minilm_cases import EXAMPLES, SENTENCES, minilm, model_dir, tokenizer

__all__ = ["model_dir", "tokenizer"]  # the fixtures this file imports, used by name


@pytest.mark.timeout(340)
@pytest.mark.parametrize(
    ("nprocs", "tp"),
    [(2, None), (4, 4), (4, 2), (3, 1)],
    ids=["n2-tp2", "n4-tp4", "n4-tp2-dp2", "n3-tp1-dp3"],
)
def test_multirank_matches_single_process(tmp_path, tokenizer, model_dir, nprocs, tp):
    """mpiexec -n N tp_inference.py: exit 0, its own reference check passes, and the written
    fp32 embeddings equal this process's single-process model (cosine > 0.99999)."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")  # 7 sentences: uneven DP chunks
    out, summary = tmp_path / "emb.npy", tmp_path / "summary.json"
    cmd = [str(EXAMPLES / "tp_inference.py")]
    cmd += ["--file", str(sentences), "--output", str(out), "--summary", str(summary)]
    cmd += ["--repeats", "1", "--batch-size", "3"]
    if tp is not None:
        cmd += ["--tp", str(tp)]
    proc = run_mpi(nprocs, *cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "single-process reference check: MATCH" in proc.stdout

    info = json.loads(summary.read_text())
    assert info["match"] is True
    rows = {r["dtype"]: r for r in info["results"]}
    assert set(rows) == {"fp32", "bf16"}
    for row in rows.values():
        assert row["world_size"] == nprocs
        assert row["tp_size"] == (tp or nprocs)
        assert row["dp_size"] == nprocs // (tp or nprocs)
        assert row["sentences"] == len(SENTENCES)
        assert row["sentences_per_s"] > 0
    assert rows["fp32"]["cosine_min"] > 0.99999
    assert rows["fp32"]["max_abs_diff"] < 1e-5
    assert rows["bf16"]["cosine_min"] > 0.999

    import numpy as np

    fp32 = torch.from_numpy(np.load(tmp_path / "emb.fp32.npy"))
    bf16 = torch.from_numpy(np.load(tmp_path / "emb.bf16.npy"))
    torch.set_num_threads(1)
    ref = minilm.encode(minilm.MiniLM(model_dir), tokenizer, SENTENCES, batch_size=3)
    assert fp32.shape == bf16.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(fp32.double(), ref.double(), dim=1)
    assert cos.min() > 0.99999
    torch.testing.assert_close(fp32, ref, atol=1e-5, rtol=0)
    assert torch.nn.functional.cosine_similarity(bf16, ref, dim=1).min() > 0.99


@pytest.mark.timeout(200)
def test_world_not_dividing_heads_exits_2():
    """5 ranks, default TP=5: 12 heads do not split; every rank exits 2 before any collective."""
    proc = run_mpi(5, str(EXAMPLES / "tp_inference.py"), "hi", timeout=150)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "does not divide the model's 12 heads" in proc.stderr
