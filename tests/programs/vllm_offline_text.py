"""Offline greedy generation with vLLM's ``LLM`` on one process: the reference for the server tests.

    python tests/programs/vllm_offline_text.py MODEL_DIR REQUEST.json

``REQUEST.json``: ``{"prompts": [...], "max_tokens": N, "chats": [[message, ...], ...],
"engine": {extra LLM(...) arguments}}``. Prints one ``VLLM_RESULT`` line (mpicomm.vllm.tiny):
``{"completions": [{"ids", "text"}, ...], "chats": [{"ids", "text"}, ...]}``, greedy (fp32).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from vllm import LLM, SamplingParams

    from mpicomm.vllm import tiny

    model, request_file = argv
    with open(request_file) as f:
        request = json.load(f)
    llm = LLM(model=model, dtype="float32", seed=0, **request.get("engine", {}))
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"])
    outputs = llm.generate(request["prompts"], params, use_tqdm=False)
    result = {"completions": [_one(o) for o in outputs]}
    chats = request.get("chats") or []
    if chats:
        result["chats"] = [_one(o) for o in llm.chat(chats, params, use_tqdm=False)]
    tiny.print_result(result)
    return 0


def _one(output) -> dict:
    return {"ids": list(output.outputs[0].token_ids), "text": output.outputs[0].text}


if __name__ == "__main__":  # vLLM CPU may spawn helpers: the guard is required
    sys.exit(main(sys.argv[1:]))
