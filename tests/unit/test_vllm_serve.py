"""mpicomm.vllm.serve without vLLM or MPI: the warm-up before the server answers (fakes for vLLM).

The server end to end is tests/system/test_vllm_serve.py.
"""

from __future__ import annotations

import asyncio
import sys
from types import ModuleType, SimpleNamespace

import pytest

from mpicomm.vllm import serve


@pytest.fixture
def fake_vllm(monkeypatch):
    """vllm.SamplingParams and vllm.inputs.TokensPrompt as plain records."""
    vllm = ModuleType("vllm")
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    inputs = ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)


class FakeAsyncLLM:
    """Records each generate() call; each stream yields two outputs."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def generate(self, prompt, params, request_id, data_parallel_rank=None):
        self.calls.append((prompt, params, request_id, data_parallel_rank))

        async def stream():
            for token in range(params.max_tokens):
                await asyncio.sleep(0)
                yield token

        return stream()


def config(runner="generate", dp=1):
    return SimpleNamespace(
        model_config=SimpleNamespace(runner_type=runner),
        parallel_config=SimpleNamespace(data_parallel_size=dp),
    )


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_warm_up_sends_one_short_greedy_request_per_replica(fake_vllm, dp):
    llm = FakeAsyncLLM()
    took = asyncio.run(serve.warm_up(llm, config(dp=dp)))
    assert took is not None and took >= 0
    assert len(llm.calls) == dp
    ranks = [c[3] for c in llm.calls]
    assert ranks == ([None] if dp == 1 else list(range(dp)))  # each replica named once
    assert len({c[2] for c in llm.calls}) == dp  # distinct request ids
    for prompt, params, _, _ in llm.calls:
        assert len(prompt["prompt_token_ids"]) >= 2  # a prefill of several tokens
        assert params.max_tokens >= 2 and params.temperature == 0.0  # then a batch of one


def test_no_warm_up_for_a_model_that_does_not_generate(fake_vllm):
    llm = FakeAsyncLLM()
    assert asyncio.run(serve.warm_up(llm, config(runner="pooling"))) is None
    assert llm.calls == []
