"""The tensor-parallel MiniLM example in one process: checked against transformers, sharded in
threads, its arguments. Across MPI ranks: tests/jobs/test_tp_inference.py.

Needs the ``examples`` extra (tests/minilm_cases.py) and ``transformers`` (``test`` extra).
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from tests.helpers import ROOT, child_env
from tests.minilm_cases import EXAMPLES, SENTENCES, minilm, model_dir, tokenizer

__all__ = ["model_dir", "tokenizer"]  # the fixtures this file imports, used by name


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer) -> torch.Tensor:
    """The single-process fp32 embeddings of SENTENCES."""
    torch.set_num_threads(1)
    return minilm.encode(minilm.MiniLM(model_dir), tokenizer, SENTENCES, batch_size=4)


def test_single_process_matches_transformers(model_dir, tokenizer, reference):
    """Our model equals transformers' BertModel from the same files, mean pooled + normalised."""
    transformers = pytest.importorskip("transformers", reason="needs the test extra")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    hf = transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    batch = hf_tok(
        SENTENCES,
        padding=True,
        truncation=True,
        max_length=minilm.MAX_SEQ_LENGTH,
        return_tensors="pt",
    )
    ours = tokenizer(SENTENCES)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(ours[key], batch[key]), key
    assert batch["input_ids"].shape[1] == minilm.MAX_SEQ_LENGTH  # the long one was truncated
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    expected = minilm.mean_pool_normalize(hidden, batch["attention_mask"])
    assert reference.shape == (len(SENTENCES), 384)
    assert reference.dtype == torch.float32
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)
    cos = torch.nn.functional.cosine_similarity(reference, expected, dim=1)
    assert cos.min() > 0.999999
    # Different sentences give different embeddings (the check above is not about constants).
    assert torch.nn.functional.cosine_similarity(reference[0], reference[1], dim=0) < 0.9


def test_embeddings_are_unit_length(reference):
    torch.testing.assert_close(reference.norm(dim=1), torch.ones(len(SENTENCES)))


def test_batch_size_does_not_change_results(model_dir, tokenizer, reference):
    one_by_one = minilm.encode(minilm.MiniLM(model_dir), tokenizer, SENTENCES, batch_size=1)
    torch.testing.assert_close(one_by_one, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_shards_reassemble_to_the_whole(model_dir, tp):
    cfg = minilm.Config.load(model_dir)
    whole = minilm.load_weights(model_dir, cfg)
    shards = [minilm.load_weights(model_dir, cfg, r, tp) for r in range(tp)]
    for name, full in whole.items():
        parts = [s[name] for s in shards]
        if ".attention.self." in name or ".intermediate.dense." in name:
            dim = 0
        elif name.endswith("output.dense.weight"):
            dim = 1
        else:
            dim = None
        if dim is None:
            for p in parts:
                assert torch.equal(p, full), name
        else:
            assert parts[0].shape[dim] == full.shape[dim] // tp, name
            assert torch.equal(torch.cat(parts, dim), full), name


def test_bad_tp_sizes_are_rejected(model_dir):
    cfg = minilm.Config.load(model_dir)
    with pytest.raises(ValueError, match="heads"):
        minilm.load_weights(model_dir, cfg, 0, 5)
    with pytest.raises(ValueError, match="tp_rank"):
        minilm.load_weights(model_dir, cfg, 2, 2)
    with pytest.raises(ValueError, match="all_reduce"):
        minilm.MiniLM(model_dir, tp_rank=0, tp_size=2)


def _threaded_tp(model_dir, tokenizer, tp, drop_rank=None):
    """Run ``tp`` MiniLM shards in threads with an in-process all_reduce (sum in rank order).
    ``drop_rank`` leaves that rank's partial out of every sum (a broken collective)."""
    barrier = threading.Barrier(tp)
    slots: list[torch.Tensor | None] = [None] * tp
    results: list[torch.Tensor | None] = [None] * tp

    def make_reduce(rank):
        def all_reduce(x):
            slots[rank] = x.clone()
            barrier.wait()
            total = sum(s for r, s in enumerate(slots) if r != drop_rank)
            barrier.wait()
            return total

        return all_reduce

    def worker(rank):
        model = minilm.MiniLM(model_dir, rank, tp, make_reduce(rank))
        results[rank] = minilm.encode(model, tokenizer, SENTENCES, batch_size=4)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a shard thread failed"
    return results


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_math_without_mpi(model_dir, tokenizer, reference, tp):
    results = _threaded_tp(model_dir, tokenizer, tp)
    for r in results:
        assert torch.equal(r, results[0])  # every TP rank ends with the same embeddings
        torch.testing.assert_close(r, reference, atol=1e-5, rtol=0)


def test_a_broken_all_reduce_is_caught(model_dir, tokenizer, reference):
    """The fp32 threshold used by tp_inference.py rejects a sum missing one rank's part."""
    results = _threaded_tp(model_dir, tokenizer, 2, drop_rank=1)
    cos = torch.nn.functional.cosine_similarity(results[0], reference, dim=1)
    assert cos.min() < 0.99999


# ---------------------------------------------------------------------------------------------
# The real script in one process (under mpiexec: tests/jobs/test_tp_inference.py).


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """One process, without mpiexec (multi-rank runs go through ``run_mpi``)."""
    return subprocess.run(
        ["timeout", str(timeout), *cmd],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--dtype", "fp8"],
        ["--batch-size", "0"],
        ["--output", "x.csv"],
        ["--tp", "0"],
        ["--file", "/nonexistent/sentences.txt"],
        ["--repeats", "0"],
        ["--tp", "5"],
    ],
)
def test_bad_arguments_exit_2_before_mpi(args, capsys):
    """parse_args rejects these with argparse's exit status 2; it runs before any MPI call."""
    import tp_inference

    with pytest.raises(SystemExit) as exc:
        tp_inference.parse_args(args)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_defaults_read_the_sample_file():
    import tp_inference

    args = tp_inference.parse_args([])
    assert len(args.sentences) == len(tp_inference.SAMPLE_FILE.read_text().splitlines()) >= 32
    assert args.dtypes == ["fp32", "bf16"]
    assert tp_inference.split_sizes(7, 3) == [3, 2, 2]
    assert tp_inference.split_sizes(2, 4) == [1, 1, 0, 0]


def test_tp_not_dividing_world_exits_2():
    proc = _run([sys.executable, str(EXAMPLES / "tp_inference.py"), "--tp", "2", "hi"], 60)
    assert proc.returncode == 2
    assert "does not divide" in proc.stderr
