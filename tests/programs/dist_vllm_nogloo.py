"""Run under ``mpiexec -n N`` with ``MPICOMM_VLLM=1 MPICOMM_VLLM_TORCH_BACKEND=mpicomm``: no gloo.

    MPICOMM_VLLM=1 MPICOMM_VLLM_TORCH_BACKEND=mpicomm mpiexec -n 4 python tests/programs/dist_vllm_nogloo.py --tp 2 --pp 2

vLLM's ``init_distributed_environment(..., backend="mpicomm")`` (the mpicomm platform's
``dist_backend``) and ``initialize_model_parallel``; then every group's cpu_group and device_group
must be mpicomm (MPI) groups, no gloo group may exist, the cpu-group traffic vLLM sends
(barrier, object broadcast, object and tensor-dict send/recv, tensor-dict broadcast) must arrive,
and every device collective is checked as in tests/programs/vllm_groups.py.
Prints ``VLLM_NOGLOO_OK rank=R checks=K`` on success; aborts the job otherwise.
"""

from __future__ import annotations

import argparse
import json

import torch

from tests.programs import vllm_groups as vg

torch.set_num_threads(1)


def exercise_cpu_group(name: str, group) -> None:
    """What vLLM sends over a coordinator's cpu_group, checked on every rank."""
    W, r, ranks = group.world_size, group.rank_in_group, group.ranks
    group.barrier()
    got = group.broadcast_object({"from": ranks[0], "group": name} if r == 0 else None, src=0)
    vg.check(got == {"from": ranks[0], "group": name}, f"{name}: broadcast_object")
    tensors = {"a": vg.make(ranks[0], (3, 2), torch.float32), "n": 7}
    got = group.broadcast_tensor_dict(tensors if r == 0 else None, src=0)
    vg.check(
        got["n"] == 7 and torch.equal(got["a"], tensors["a"]), f"{name}: broadcast_tensor_dict"
    )
    nxt, prev = (r + 1) % W, (r - 1) % W
    if r % 2 == 0:
        group.send_object(("obj", ranks[r]), dst=nxt)
        got = group.recv_object(src=prev)
    else:
        got = group.recv_object(src=prev)
        group.send_object(("obj", ranks[r]), dst=nxt)
    vg.check(got == ("obj", ranks[prev]), f"{name}: send_object/recv_object")
    if W == 2:  # a pipeline hand-off: metadata on the cpu group, tensors on the device group
        mine = {"h": vg.make(ranks[r], (4, 5), torch.bfloat16), "step": r}
        if r == 0:
            group.send_tensor_dict(mine, dst=1)
        else:
            got = group.recv_tensor_dict(src=0)
            want = vg.make(ranks[0], (4, 5), torch.bfloat16)
            vg.check(got["step"] == 0 and torch.equal(got["h"], want), f"{name}: send_tensor_dict")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    args = ap.parse_args()

    from mpicomm.vllm.launch import export_torch_env
    from mpicomm.vllm.torch_backend import DIST_BACKEND, check_no_gloo, gloo_groups, on_mpi

    env = export_torch_env()
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])

    import torch.distributed as dist
    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.platforms import current_platform

    vg.check(
        type(current_platform).__name__ == "MPICpuPlatform",
        f"platform is {type(current_platform).__name__}, want MPICpuPlatform",
    )
    vg.check(current_platform.dist_backend == DIST_BACKEND, "platform's dist_backend")
    pc = ParallelConfig(
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        distributed_executor_backend="external_launcher",
    )
    cfg = VllmConfig(parallel_config=pc, device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(
            world_size,
            rank,
            "env://",
            int(env["LOCAL_RANK"]),
            backend=current_platform.dist_backend,
        )
        ps.initialize_model_parallel(args.tp, args.pp)
        vg.check(dist.get_backend() == DIST_BACKEND, f"default backend {dist.get_backend()}")
        vg.check(on_mpi(dist.group.WORLD), "default group is not on MPI")
        groups = vg.parallel_groups(ps)
        summary = {}
        for name, group in groups.items():
            kinds = (type(group.cpu_group).__name__, type(group.device_group).__name__)
            summary[name] = (group.ranks, *kinds)
            vg.check(on_mpi(group.cpu_group), f"{name}: cpu_group is {kinds[0]}")
            vg.check(on_mpi(group.device_group), f"{name}: device_group is {kinds[1]}")
            if group.world_size > 1:
                exercise_cpu_group(name, group)
                if name != "world":
                    vg.exercise_group(name, group, groups["world"])
        vg.check(not gloo_groups(), f"gloo groups: {gloo_groups()}")
        check_no_gloo()
        if rank == 0:
            print("GROUPS " + json.dumps(summary), flush=True)
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()

    if vg.FAILURES:
        print(f"VLLM_NOGLOO_FAIL rank={rank}: " + "; ".join(vg.FAILURES), flush=True)
        return 1
    print(f"VLLM_NOGLOO_OK rank={rank} checks={vg.CHECKS[0]}", flush=True)
    return 0


if __name__ == "__main__":
    vg.run_or_abort(main)
