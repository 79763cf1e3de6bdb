"""GPU benchmark: mpicomm on CUDA tensors vs torch.distributed gloo on the same tensors, and vs the
device <-> pinned-host copy bandwidth measured in the same run. JSON out.

    timeout 900 mpiexec -n 2 python benchmarks/gpu_bench.py --out gpu_n2.json
    timeout 900 mpiexec -n 4 python benchmarks/gpu_bench.py --out gpu_n4.json

Collectives all_reduce, all_gather and reduce_scatter; bfloat16 and float32; sizes 4 KiB to 256 MiB
(x4 steps). Size conventions as nccl-tests: ``bytes`` is the all_reduce buffer, the all_gather
*output* and the reduce_scatter *input*; algbw = bytes / time; busbw = algbw * 2(W-1)/W for
all_reduce and * (W-1)/W for the other two.

Timing: each rank times every iteration (the call plus a device synchronize, so the result is
ready) on its own clock; after the loop the per-iteration times are max-reduced over ranks and the
median is reported. Every case is checked once after its loop (inputs are rank+1 everywhere, so
sums and gathers have exact expected values in both dtypes).

Copy bandwidth: device->pinned host and pinned host->device copies of each size, timed alone (rank
0, the others wait) and with every rank copying at once (several ranks share one GPU here), the
way the staging path copies. ``staging_floor_us`` of a case is the time its staged copies would
take at the concurrent bandwidth (input D2H + output H2D): a lower bound for the staging path.

``--device cpu`` runs the same sweep on CPU tensors (no copies measured): a dry run of the script.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import socket
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

from mpicomm import MPICommunicator
from mpicomm.cuda import cuda_awareness_report
from mpicomm.topology import default_device, node_topology

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def sizes(low: int, high: int, factor: int) -> list[int]:
    out, n = [], low
    while n <= high:
        out.append(n)
        n *= factor
    return out


def iterations(nbytes: int, budget: int, low: int = 3, high: int = 50) -> int:
    return max(low, min(high, budget // max(nbytes, 1)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(comm: MPI.Comm, run, device: torch.device, warmup: int, iters: int) -> np.ndarray:
    """Per-iteration seconds of ``run`` (+ device sync), max over ranks."""
    for _ in range(warmup):
        run()
    sync(device)
    comm.Barrier()
    times = np.zeros(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        run()
        sync(device)
        times[i] = time.perf_counter() - t0
    slowest = np.empty_like(times)
    comm.Allreduce(times, slowest, MPI.MAX)
    return slowest


def summary(times: np.ndarray) -> dict:
    return {
        "median_us": float(np.median(times) * 1e6),
        "min_us": float(np.min(times) * 1e6),
        "iters": int(times.size),
    }


# --------------------------------------------------------------------------- copy bandwidth
def copy_bandwidth(comm: MPI.Comm, device, nbytes: int, budget: int) -> dict:
    """GB/s of D2H and H2D copies between device memory and pinned host memory."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    iters = iterations(nbytes, budget, 5, 100)
    out = {"bytes": nbytes}
    for name, run in (("d2h", lambda: host.copy_(dev)), ("h2d", lambda: dev.copy_(host))):
        # alone: rank 0 copies while the others wait at the barrier inside timed()
        solo = comm.Split(0 if comm.Get_rank() == 0 else MPI.UNDEFINED)
        if solo != MPI.COMM_NULL:
            t = timed(solo, run, device, 2, iters)
            solo.Free()
            alone = nbytes / np.median(t) / 1e9
        else:
            alone = 0.0
        out[f"{name}_alone_GBps"] = comm.bcast(alone, root=0)
        t = timed(comm, run, device, 2, iters)
        out[f"{name}_concurrent_GBps"] = nbytes / np.median(t) / 1e9
    return out


# --------------------------------------------------------------------------- gloo
def init_gloo(comm: MPI.Comm) -> str | None:
    """torch.distributed with gloo on the MPI ranks; returns an error text instead of raising."""
    try:
        if comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            host = os.environ.get("MASTER_ADDR") or socket.gethostname()
            if node_topology(comm).num_nodes == 1:
                host = "127.0.0.1"
        else:
            port = host = None
            node_topology(comm)
        port, host = comm.bcast((port, host), root=0)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{host}:{port}",
            rank=comm.Get_rank(),
            world_size=comm.Get_size(),
        )
        return None
    except Exception as exc:  # noqa: BLE001 - reported in the JSON
        return f"{type(exc).__name__}: {exc}"


def gloo_call(name: str, x: torch.Tensor, world: int):
    """A callable running collective ``name`` with gloo on ``x`` (preallocated outputs)."""
    if name == "all_reduce":
        y = x.clone()  # in place, as gloo works; the check starts again from x

        def fresh():
            y.copy_(x)
            dist.all_reduce(y)
            return y

        return lambda: dist.all_reduce(y), fresh
    if name == "all_gather":
        out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
        try:
            dist.all_gather_into_tensor(out, x)
            return lambda: dist.all_gather_into_tensor(out, x), lambda: out
        except Exception:  # noqa: BLE001 - older gloo: the list form
            parts = list(out.chunk(world))
            return lambda: dist.all_gather(parts, x), lambda: out
    out = torch.empty(x.numel() // world, dtype=x.dtype, device=x.device)
    try:
        dist.reduce_scatter_tensor(out, x)
        return lambda: dist.reduce_scatter_tensor(out, x), lambda: out
    except Exception:  # noqa: BLE001 - the list form, where gloo has one
        parts = list(x.chunk(world))
        dist.reduce_scatter(out, parts)
        return lambda: dist.reduce_scatter(out, parts), lambda: out


def mpicomm_call(comm: MPICommunicator, name: str, x: torch.Tensor):
    holder = {}

    def run():
        holder["r"] = getattr(comm, name)(x, 0) if name != "all_reduce" else comm.all_reduce(x)

    return run, lambda: holder["r"]


def expected_ok(name: str, result: torch.Tensor, world: int, rank: int) -> bool:
    """Inputs are rank+1 everywhere: sums are W(W+1)/2, gathers hold r+1 in chunk r."""
    result = result.float().reshape(-1)
    if name == "all_gather":
        want = torch.arange(1, world + 1, dtype=torch.float32, device=result.device)
        rows = result.view(world, -1)
        return bool(torch.equal(rows, want[:, None].expand(world, rows.shape[1])))
    return bool(torch.all(result == world * (world + 1) / 2).item())


def input_for(name: str, nbytes: int, dtype, world: int, rank: int, device) -> torch.Tensor:
    numel = nbytes // dtype.itemsize
    if name == "all_gather":
        numel //= world
    numel -= numel % world
    return torch.full((max(numel, world),), rank + 1, dtype=dtype, device=device)


def busbw_factor(name: str, world: int) -> float:
    return 2 * (world - 1) / world if name == "all_reduce" else (world - 1) / world


def staging_floor_us(name: str, nbytes: int, world: int, bw: dict | None) -> float | None:
    """Seconds the staging copies of one case take at the concurrent copy bandwidth (in us)."""
    if not bw or not bw.get("d2h_concurrent_GBps") or not bw.get("h2d_concurrent_GBps"):
        return None
    into = nbytes // world if name == "all_gather" else nbytes
    back = nbytes // world if name == "reduce_scatter" else nbytes
    seconds = into / (bw["d2h_concurrent_GBps"] * 1e9) + back / (bw["h2d_concurrent_GBps"] * 1e9)
    return seconds * 1e6


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="JSON file (rank 0 writes it)")
    p.add_argument("--min-bytes", type=parse_size, default=4 << 10)
    p.add_argument("--max-bytes", type=parse_size, default=256 << 20)
    p.add_argument("--factor", type=int, default=4, help="size step (default x4)")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--collectives", default=",".join(COLLECTIVES))
    p.add_argument("--device", choices=("auto", "cpu"), default="auto")
    p.add_argument("--iter-bytes", type=parse_size, default=1 << 30, help="bytes per timed loop")
    p.add_argument("--no-gloo", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renames of gloo calls

    world_comm = MPI.COMM_WORLD
    rank, world = world_comm.Get_rank(), world_comm.Get_size()
    topo = node_topology(world_comm)
    device = default_device(topo.local_rank) if args.device == "auto" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = MPICommunicator(world_comm, device=device, unique_name="gpu_bench")
    gloo_error = "disabled (--no-gloo)" if args.no_gloo else init_gloo(world_comm)
    byte_sizes = sizes(args.min_bytes, args.max_bytes, args.factor)

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "world_size": world,
        "nodes": topo.num_nodes,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "cuda_aware": cuda_awareness_report(),
        "path": "staged" if comm._staged(device) else "direct",
        "gloo": gloo_error or "ok",
        "python": sys.version.split()[0],
        "timing": "median over iterations of the slowest rank's time (call + device sync)",
    }

    copies = []
    if device.type == "cuda":
        for n in byte_sizes:
            copies.append(copy_bandwidth(world_comm, device, n, args.iter_bytes))
            if rank == 0:
                c = copies[-1]
                print(
                    f"copy {n:>10} B  d2h {c['d2h_alone_GBps']:6.1f} / {c['d2h_concurrent_GBps']:6.1f}"
                    f"  h2d {c['h2d_alone_GBps']:6.1f} / {c['h2d_concurrent_GBps']:6.1f} GB/s "
                    "(alone / all ranks at once)",
                    flush=True,
                )
    bw_of = {c["bytes"]: c for c in copies}

    results = []
    for name in args.collectives.split(","):
        for short in args.dtypes.split(","):
            dtype = DTYPES[short]
            for n in byte_sizes:
                x = input_for(name, n, dtype, world, rank, device)
                iters = iterations(n, args.iter_bytes)
                row = {"collective": name, "dtype": short, "bytes": n, "count": x.numel()}
                impls = [("mpicomm", functools.partial(mpicomm_call, comm, name, x))]
                if gloo_error is None:
                    impls.append(("gloo", functools.partial(gloo_call, name, x, world)))
                for impl, make in impls:
                    entry = {}
                    try:
                        run, result = make()
                        t = timed(world_comm, run, device, 2, iters)
                        entry.update(summary(t))
                        ok = expected_ok(name, result(), world, rank)
                        entry["ok"] = bool(world_comm.allreduce(ok, op=MPI.LAND))
                        sec = entry["median_us"] / 1e6
                        entry["algbw_GBps"] = n / sec / 1e9
                        entry["busbw_GBps"] = entry["algbw_GBps"] * busbw_factor(name, world)
                    except Exception as exc:  # noqa: BLE001 - recorded, e.g. gloo lacks an op
                        entry = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                        world_comm.Barrier()
                    row[impl] = entry
                floor = staging_floor_us(name, n, world, bw_of.get(n))
                row["staging_floor_us"] = floor
                m, g = row["mpicomm"].get("median_us"), row.get("gloo", {}).get("median_us")
                row["gloo_over_mpicomm"] = g / m if m and g else None
                row["floor_over_mpicomm"] = floor / m if m and floor else None
                results.append(row)
                if rank == 0:
                    ratio = f"{row['gloo_over_mpicomm']:.2f}x" if row["gloo_over_mpicomm"] else "-"
                    mpi_t = f"{m:10.1f}" if m else row["mpicomm"].get("error", "?")[:10]
                    gl_t = f"{g:10.1f}" if g else str(row.get("gloo", {}).get("error", "-"))[:40]
                    print(
                        f"{name:<15}{short:<5}{n:>10} B  mpicomm {mpi_t} us  gloo {gl_t} us  "
                        f"gloo/mpicomm {ratio}  ok={row['mpicomm'].get('ok')}",
                        flush=True,
                    )
                del x

    if rank == 0:
        doc = {"meta": meta, "copy_bandwidth": copies, "results": results}
        out = args.out or f"gpu_bench_{platform.node()}_n{world}.json"
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {out}", flush=True)
    comm.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    bad = [r for r in results if not r["mpicomm"].get("ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
