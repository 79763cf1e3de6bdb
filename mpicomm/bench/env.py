"""Setting up what the benchmark compares: the communicator under test, gloo, and run metadata."""

from __future__ import annotations

import datetime
import importlib.util
import os
import platform
import socket
import sys
import warnings

import numpy as np
import torch

import mpicomm

from .._mpi import MPI


def make_communicator(device: torch.device, algo: str | None = None):
    """An ``MPICommunicator`` over COMM_WORLD (collective: it duplicates the communicator).

    ``algo`` selects the all-reduce algorithm (``native``/``bytes``/``auto``) through the
    constructor's ``allreduce_algo=``; ``None`` keeps the user's setting (``MPICOMM_ALLREDUCE_ALGO``).
    """
    return mpicomm.MPICommunicator(
        cpu_group=MPI.COMM_WORLD,
        device=device,
        unique_name=f"bench:{algo or 'default'}",
        allreduce_algo=algo,
    )


def rank_device(comm: MPI.Comm, name: str) -> torch.device:
    """The device of this rank: ``cuda`` without an index becomes ``cuda:<local rank % GPUs>``
    (ranks of one node spread over its GPUs) and is made current; anything else as given."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local = node.rank
        node.Free()
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def load_targets(path: str):
    """The module in file ``path`` (``--targets``): it provides ``evaluate(results, stat)`` and
    ``evaluate_crossover(cross, stat)``, each returning verdict dicts (docs/benchmarks.md)."""
    spec = importlib.util.spec_from_file_location("mpicomm_bench_targets", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--targets: cannot load {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def init_gloo(comm: MPI.Comm) -> str | None:
    """Initialise torch.distributed with gloo on every rank; ``None`` or the reason it failed.

    Rendezvous through ``env://`` on 127.0.0.1 with a free port chosen by rank 0 and broadcast.
    All ranks agree on the outcome.
    """
    import torch.distributed as dist

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    error = None
    try:
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", init_method="env://", rank=comm.rank, world_size=comm.size
            )
    except Exception as exc:  # noqa: BLE001 - reported, gloo is then skipped
        error = f"gloo init failed: {type(exc).__name__}: {exc}"
    errors = [e for e in comm.allgather(error) if e]
    if errors and error is None and dist.is_initialized():
        dist.destroy_process_group()
    return errors[0] if errors else None


def close_gloo() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_line() -> str:
    """The CPU model and whether it has AVX-512, for every benchmark's header (vLLM CPU's own
    shared-memory all-reduce needs AVX-512; without it vLLM's TP groups use gloo)."""
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = "avx512f" in f.read().split()
    except OSError:
        avx512 = False
    return f"{_cpu_model()}, {'AVX-512' if avx512 else 'no AVX-512'}"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def metadata(comm: MPI.Comm, argv: list[str], device: torch.device) -> dict:
    """Machine, libraries and command of this run (gathered hostnames from every rank)."""
    import mpi4py

    hosts = comm.allgather(socket.gethostname())
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "mpicomm", "bench", *argv]),
        "argv": list(argv),
        "nranks": comm.size,
        "hosts": sorted(set(hosts)),
        "rank_hosts": hosts,
        "machine": {
            "hostname": socket.gethostname(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpus": os.cpu_count(),
            "memory_gib": _memory_gib(),
            "python": platform.python_version(),
        },
        "mpi": {
            "library": MPI.Get_library_version().strip().splitlines()[0],
            "standard": "{}.{}".format(*MPI.Get_version()),
            "thread_level": MPI.Query_thread(),
        },
        "versions": {
            "mpicomm": getattr(mpicomm, "__version__", "unknown"),
            "mpi4py": mpi4py.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "env": {k: v for k, v in os.environ.items() if k.startswith("MPICOMM_")},
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta
