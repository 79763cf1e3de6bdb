"""Run under ``mpiexec -n N``: vLLM's own process groups on mpicomm, every collective checked.

    MPICOMM_VLLM=1 mpiexec -n 4 python tests/programs/vllm_groups.py --tp 2 --dp 2 --ep

Each rank exports RANK/WORLD_SIZE/... from MPI, calls vLLM's ``init_distributed_environment``
(gloo) and ``initialize_model_parallel``, then drives every ``GroupCoordinator`` collective of the
TP, PP, DP, EP and world groups (all_reduce, all_gather, reduce_scatter, all_gatherv,
reduce_scatterv, gather, send/recv; MoE dispatch/combine on the EP group through vLLM's
all-gather/reduce-scatter manager) in float32, bfloat16 and int64, compares each result with a
reference computed locally from every rank's (deterministic) input, and checks that the call
reached ``VllmMPICommunicator`` (its ``calls`` counter). ``--expect-native`` checks the opposite:
without ``MPICOMM_VLLM=1`` vLLM keeps its own platform and communicator.

Prints ``VLLM_GROUPS_OK rank=R checks=K`` on success; exits 1 with the failures otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch

torch.set_num_threads(1)

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
FAILURES: list[str] = []
CHECKS = [0]


def check(cond: bool, what: str) -> None:
    CHECKS[0] += 1
    if not cond:
        FAILURES.append(what)


def make(global_rank: int, shape, dtype, salt: int = 0) -> torch.Tensor:
    """Deterministic input of ``global_rank``: every rank can rebuild every other rank's input."""
    g = torch.Generator().manual_seed(1009 * global_rank + 17 * salt + 3)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=torch.int64).to(dtype)


def total(tensors: list[torch.Tensor]) -> torch.Tensor:
    """CONTRACT sum: exact for ints; floats accumulated in fp32 (fp64 for fp64), rounded once."""
    dtype = tensors[0].dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if not dtype.is_floating_point:
        acc_dtype = torch.int64
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype)
    for t in tensors:
        acc += t.to(acc_dtype)
    return acc.to(dtype)


def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal for ints/fp32 (sum in rank order); within one bf16 ulp for bf16."""
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return False
    if ref.dtype == torch.bfloat16:
        diff = (got.float() - ref.float()).abs()
        return bool((diff <= ref.float().abs() * 2.0**-7 + 1e-30).all())
    if ref.dtype.is_floating_point:
        return torch.allclose(got, ref, rtol=1e-6, atol=1e-6)
    return torch.equal(got, ref)


def parallel_groups(ps) -> dict:
    """vLLM's group coordinators by name, from its ``parallel_state`` module ``ps``."""
    return {
        "world": ps.get_world_group(),
        "tp": ps.get_tp_group(),
        "pp": ps.get_pp_group(),
        "dp": ps.get_dp_group(),
        "ep": ps.get_ep_group(),
    }


def exercise_group(name: str, group, world) -> None:
    """Every GroupCoordinator collective of ``group``, against references built locally."""
    from mpicomm.vllm.communicator import VllmMPICommunicator

    comm = group.device_communicator
    check(isinstance(comm, VllmMPICommunicator), f"{name}: communicator is {type(comm)}")
    if not isinstance(comm, VllmMPICommunicator):
        return
    W, r, ranks = group.world_size, group.rank_in_group, group.ranks
    check(comm.mpi.world_size == W and comm.mpi.rank_in_group == r, f"{name}: rank mapping")
    comm.prepare_communication_buffer_for_model(torch.nn.Linear(4, 4))  # must not raise
    before = dict(comm.calls)

    for i, dtype in enumerate(DTYPES):
        shape = (4 * W, 3)
        inputs = [make(g, shape, dtype, i) for g in ranks]
        mine = inputs[r]
        snapshot = mine.clone()
        s = total(inputs)
        check(close(group.all_reduce(mine), s), f"{name}: all_reduce {dtype}")
        check(
            close(group.all_gather(mine, dim=0), torch.cat(inputs, 0)),
            f"{name}: all_gather {dtype}",
        )
        check(
            close(group.all_gather(mine, dim=-1), torch.cat(inputs, -1)),
            f"{name}: all_gather dim=-1 {dtype}",
        )
        check(
            close(group.reduce_scatter(mine, dim=0), torch.chunk(s, W, 0)[r]),
            f"{name}: reduce_scatter {dtype}",
        )
        # variable rows per rank: rank j owns j + 1 rows
        sizes = [j + 1 for j in range(W)]
        rows = [make(g, (sizes[j], 5), dtype, 10 + i) for j, g in enumerate(ranks)]
        check(
            close(group.all_gatherv(rows[r], dim=0, sizes=sizes), torch.cat(rows, 0)),
            f"{name}: all_gatherv {dtype}",
        )
        pair = group.all_gatherv([rows[r], rows[r][:, :2].contiguous()], dim=0, sizes=sizes)
        check(
            isinstance(pair, list) and close(pair[1], torch.cat([x[:, :2] for x in rows], 0)),
            f"{name}: all_gatherv list {dtype}",
        )
        full = [make(g, (sum(sizes), 2), dtype, 20 + i) for g in ranks]
        fs = total(full)
        start = sum(sizes[:r])
        check(
            close(group.reduce_scatterv(full[r], dim=0, sizes=sizes), fs[start : start + sizes[r]]),
            f"{name}: reduce_scatterv {dtype}",
        )
        got = group.gather(mine, dst=W - 1, dim=0)
        if r == W - 1:
            check(got is not None and close(got, torch.cat(inputs, 0)), f"{name}: gather {dtype}")
        else:
            check(got is None, f"{name}: gather on non-root returned {type(got)}")
        check(torch.equal(mine, snapshot), f"{name}: input mutated ({dtype})")

    # point-to-point around the ring
    t = make(ranks[r], (3, 2), torch.float32, 99)
    if r % 2 == 0:
        group.send(t)
        got = group.recv(t.shape, t.dtype)
    else:
        got = group.recv(t.shape, t.dtype)
        group.send(t)
    check(close(got, make(ranks[(r - 1) % W], (3, 2), torch.float32, 99)), f"{name}: send/recv")

    after = comm.calls
    for op in (
        "all_reduce",
        "all_gather",
        "reduce_scatter",
        "all_gatherv",
        "reduce_scatterv",
        "gather",
        "send",
        "recv",
    ):
        check(after.get(op, 0) > before.get(op, 0), f"{name}: {op} never reached mpicomm")


def exercise_moe(cfg, ep_group, dp_group, tp_group) -> None:
    """EP-group dispatch/combine through vLLM's AgRs manager, in fp32 and bf16."""
    from vllm.forward_context import get_forward_context, set_forward_context

    comm = ep_group.device_communicator
    check(comm.all2all_manager is not None, "ep: no all2all manager (use_all2all false?)")
    check(
        type(comm.all2all_manager).__name__ == "AgRsAll2AllManager",
        f"ep: manager is {type(comm.all2all_manager).__name__}",
    )
    dp_comm = dp_group.device_communicator
    D, d = dp_group.world_size, dp_group.rank_in_group
    # tokens are replicated inside a TP group: inputs depend on the DP rank only
    counts = [2 + j for j in range(D)]
    n = counts[d]
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        hs = [make(1000 + j, (counts[j], 8), dtype, i) for j in range(D)]
        lg = [make(2000 + j, (counts[j], 4), torch.float32, i) for j in range(D)]
        before = dict(dp_comm.calls)
        with set_forward_context(
            None, cfg, num_tokens=n, num_tokens_across_dp=torch.tensor(counts, dtype=torch.int32)
        ):
            meta = get_forward_context().dp_metadata
            sized = meta.sp_local_sizes(1) if hasattr(meta, "sp_local_sizes") else None
            if sized is not None:
                sized.__enter__()
            try:
                from mpicomm.vllm.communicator import TOPK_DISPATCH

                if TOPK_DISPATCH:
                    ids = [make(3000 + j, (counts[j], 2), torch.int64, i) for j in range(D)]
                    out = ep_group.dispatch(hs[d], lg[d], ids[d])
                    check(close(out[2], torch.cat(ids, 0)), f"moe: dispatch topk_ids {dtype}")
                else:
                    out = ep_group.dispatch(hs[d], lg[d])
                check(close(out[0], torch.cat(hs, 0)), f"moe: dispatch hidden {dtype}")
                check(close(out[1], torch.cat(lg, 0)), f"moe: dispatch logits {dtype}")
                # each rank's "expert output" over all gathered tokens; combine sums over DP
                # ranks and returns this rank's rows
                contrib = [make(4000 + j, (sum(counts), 8), dtype, i) for j in range(D)]
                back = ep_group.combine(contrib[d])
                start = sum(counts[:d])
                check(close(back, total(contrib)[start : start + n]), f"moe: combine {dtype}")
            finally:
                if sized is not None:
                    sized.__exit__(None, None, None)
        after = dp_comm.calls
        check(after["all_gatherv"] > before.get("all_gatherv", 0), "moe: dispatch missed mpicomm")
        check(
            after["reduce_scatterv"] > before.get("reduce_scatterv", 0),
            "moe: combine missed mpicomm",
        )
    check(comm.calls["dispatch"] >= 2 and comm.calls["combine"] >= 2, "moe: EP calls not counted")


def exercise_moe_fallback(ep_group) -> None:
    """EP group without DP (no vLLM all2all manager): mpicomm's own dispatch/combine, which
    gathers every EP rank's tokens (own row count per rank) and sums them back."""
    from mpicomm.vllm.communicator import TOPK_DISPATCH

    comm = ep_group.device_communicator
    check(comm.all2all_manager is None, "ep fallback: unexpected all2all manager")
    E, e, ranks = ep_group.world_size, ep_group.rank_in_group, ep_group.ranks
    counts = [1 + (j % 3) for j in range(E)]
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        hs = [make(g, (counts[j], 6), dtype, 50 + i) for j, g in enumerate(ranks)]
        lg = [make(g, (counts[j], 3), torch.float32, 60 + i) for j, g in enumerate(ranks)]
        ex = [make(g, (counts[j],), torch.int64, 70 + i) for j, g in enumerate(ranks)]
        if TOPK_DISPATCH:
            ids = [make(g, (counts[j], 2), torch.int64, 80 + i) for j, g in enumerate(ranks)]
            out = ep_group.dispatch(hs[e], lg[e], ids[e], False, [ex[e]])
            check(close(out[2], torch.cat(ids, 0)), f"ep fallback: topk_ids {dtype}")
            extras = out[3]
        else:
            out = ep_group.dispatch(hs[e], lg[e], False, [ex[e]])
            extras = out[2]
        check(close(out[0], torch.cat(hs, 0)), f"ep fallback: hidden {dtype}")
        check(close(out[1], torch.cat(lg, 0)), f"ep fallback: logits {dtype}")
        check(close(extras[0], torch.cat(ex, 0)), f"ep fallback: extra {dtype}")
        contrib = [make(g, (sum(counts), 6), dtype, 90 + i) for g in ranks]
        start = sum(counts[:e])
        back = ep_group.combine(contrib[e])
        check(
            close(back, total(contrib)[start : start + counts[e]]), f"ep fallback: combine {dtype}"
        )
    check(comm.calls["dispatch"] >= 2 and comm.calls["combine"] >= 2, "ep fallback: not counted")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--ep", action="store_true")
    ap.add_argument("--expect-native", action="store_true")
    args = ap.parse_args()

    from mpicomm.vllm.launch import export_torch_env

    env = export_torch_env()
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])

    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.platforms import current_platform

    platform = type(current_platform).__name__
    if args.expect_native:
        check(platform != "MPICpuPlatform", f"platform is {platform} without MPICOMM_VLLM")
    else:
        check(platform == "MPICpuPlatform", f"platform is {platform}, want MPICpuPlatform")

    pc = ParallelConfig(
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        data_parallel_size=args.dp,
        enable_expert_parallel=args.ep,
        distributed_executor_backend="external_launcher",
    )
    cfg = VllmConfig(parallel_config=pc, device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(
            world_size, rank, "env://", int(env["LOCAL_RANK"]), backend="gloo"
        )
        ps.initialize_model_parallel(args.tp, args.pp)
        groups = parallel_groups(ps)
        summary = {}
        for name, group in groups.items():
            summary[name] = (group.ranks, type(group.device_communicator).__name__)
            if group.world_size == 1 or name == "world":
                # vLLM builds no device communicator for size-1 groups nor for the world group
                check(group.device_communicator is None, f"{name}: unexpected communicator")
                continue
            if args.expect_native:
                from mpicomm.vllm.communicator import VllmMPICommunicator

                check(
                    not isinstance(group.device_communicator, VllmMPICommunicator),
                    f"{name}: mpicomm used without MPICOMM_VLLM=1",
                )
                x = make(rank, (4,), torch.float32)
                y = group.all_reduce(x.clone())
                ref = total([make(g, (4,), torch.float32) for g in group.ranks])
                check(torch.allclose(y, ref, atol=1e-5), f"{name}: native all_reduce wrong")
                continue
            exercise_group(name, group, groups["world"])
        if not args.expect_native and args.dp > 1 and args.ep:
            exercise_moe(cfg, groups["ep"], groups["dp"], groups["tp"])
        elif not args.expect_native and args.ep and groups["ep"].world_size > 1:
            exercise_moe_fallback(groups["ep"])
        if rank == 0:
            print("GROUPS " + json.dumps(summary), flush=True)
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()

    if FAILURES:
        print(f"VLLM_GROUPS_FAIL rank={rank}: " + "; ".join(FAILURES), flush=True)
        return 1
    print(f"VLLM_GROUPS_OK rank={rank} checks={CHECKS[0]}", flush=True)
    return 0


def run_or_abort(main) -> None:
    """Exit with ``main()``'s code; a failing rank (an exception or a non-zero code) aborts the
    whole job, so its peers never wait in a collective it will not enter."""
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        code = 1
    if code:
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(code)
    sys.exit(code)


if __name__ == "__main__":
    run_or_abort(main)
