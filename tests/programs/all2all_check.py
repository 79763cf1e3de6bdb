"""Expert routers under mpiexec: ``timeout 120 mpiexec -n W python tests/programs/all2all_check.py``.

Every rank builds every rank's tokens from one seed, so each can compute the single-process MoE
output and compare its own slice. Prints ``ALL2ALL OK rank r`` per rank on success, then runs
``examples/moe_layer.py`` in the same job (one MPI start-up for both; it prints ``MOE LAYER OK``
four times per rank). Any mismatch aborts the job (non-zero exit).
"""

from __future__ import annotations

import runpy
import sys
import traceback
from pathlib import Path

import torch
from mpi4py import MPI

import mpicomm
from mpicomm.moe import ExpertRouter, GatheredRouter

torch.set_num_threads(1)
HIDDEN = 16
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float64: (1e-12, 1e-12)}


def expert_weights(num_experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(num_experts, HIDDEN, HIDDEN, generator=g, dtype=torch.float64) / 4


def expert(weights: torch.Tensor, e: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on rows x (any float dtype), computed in float64 and returned in x's dtype."""
    return torch.tanh(x.double() @ weights[e]).to(x.dtype)


def make_inputs(world: int, k: int, dtype, seed: int, used: list[int], empty: int):
    """Per-rank (hidden, topk_ids, topk_weights); rank ``empty`` has no tokens; only ``used``
    experts are routed to."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        n = 0 if r == empty else int(torch.randint(1, 9, (1,), generator=g))
        hidden = torch.randn(n, HIDDEN, generator=g).to(dtype)
        pick = torch.randint(0, len(used), (n, k), generator=g)
        ids = torch.tensor(used, dtype=torch.int64)[pick].to(torch.int32)
        weights = torch.softmax(torch.randn(n, k, generator=g), dim=-1)
        out.append((hidden, ids, weights))
    return out


def reference(weights, hidden, ids, topk_weights) -> torch.Tensor:
    """Single-process MoE output: fp32 (fp64 for fp64) sum of weight * expert(x), rounded once."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(hidden.shape, dtype=acc)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            y = expert(weights, int(ids[t, j]), hidden[t : t + 1])[0]
            out[t] += topk_weights[t, j].to(acc) * y.to(acc)
    return out.to(hidden.dtype)


def run_experts(weights, router, recv) -> torch.Tensor:
    """Apply this rank's experts to the rows it received (grouped by expert)."""
    out = torch.empty_like(recv.hidden_states)
    for e in range(router.local_experts):
        rows = recv.expert_ids == e
        if rows.any():
            out[rows] = expert(weights, router.first_expert + e, recv.hidden_states[rows])
    return out


def expected_rows(inputs, router, rank):
    """The rows (and local ids) the sparse router must deliver to ``rank``, in order."""
    rows, local = [], []
    lo, hi = rank * router.local_experts, (rank + 1) * router.local_experts
    for hidden, ids, _ in inputs:
        flat = ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        for p in order.tolist():
            if lo <= flat[p] < hi:
                rows.append(hidden[p // ids.shape[1]])
                local.append(int(flat[p]) - lo)
    width = inputs[0][0].shape[1]
    stacked = torch.stack(rows) if rows else torch.empty(0, width, dtype=inputs[0][0].dtype)
    return stacked, torch.tensor(local, dtype=torch.int64)


def check_round(comm, backend, num_experts, k, dtype, seed, used, empty=1) -> None:
    world, rank = comm.world_size, comm.rank
    router = comm.expert_router(num_experts, backend=backend)
    weights = expert_weights(num_experts)
    inputs = make_inputs(world, k, dtype, seed, used, empty)
    hidden, ids, topk_weights = inputs[rank]
    before = hidden.clone()
    recv = router.dispatch(hidden, ids, topk_weights)
    assert torch.equal(hidden, before), "dispatch mutated its input"
    assert recv.hidden_states.dtype == dtype and recv.expert_ids.dtype == torch.int64
    assert int(recv.tokens_per_expert.sum()) == recv.hidden_states.shape[0]
    want_rows, want_ids = expected_rows(inputs, router, rank)
    if backend == "sparse_alltoallv":
        assert torch.equal(recv.hidden_states, want_rows), "sparse dispatch delivered wrong rows"
        assert torch.equal(recv.expert_ids, want_ids), "sparse dispatch: wrong expert ids"
        dest = ids.long() // router.local_experts  # (n, k) destination rank of each pair
        remote_pairs = int((dest != rank).sum())
        remote_rows = sum(len(set(row.tolist()) - {rank}) for row in dest)  # once per token, rank
        row_bytes = HIDDEN * hidden.element_size()
        assert router.last_bytes["dispatch"] == remote_rows * row_bytes + remote_pairs * 16
    else:
        got = torch.bincount(recv.expert_ids, minlength=router.local_experts)
        assert torch.equal(got, torch.bincount(want_ids, minlength=router.local_experts))
    out = router.combine(run_experts(weights, router, recv))
    ref = reference(weights, hidden, ids, topk_weights)
    assert out.shape == hidden.shape and out.dtype == dtype, (out.shape, out.dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    if backend == "sparse_alltoallv":
        assert router.last_bytes["combine"] == combine_bytes(inputs, router, rank, dtype)


def combine_bytes(inputs, router, rank, dtype) -> int:
    """What ``rank`` (as an expert rank) sends back to the other owners in combine: per link the
    smaller of the per-pair outputs (dtype) and the per-token float32/64 sums."""
    acc = 8 if dtype == torch.float64 else 4
    total = 0
    for owner, (_, ids, _) in enumerate(inputs):
        if owner == rank:
            continue
        mine = (ids.long() // router.local_experts) == rank  # (n, k) pairs routed to rank
        pairs, rows = int(mine.sum()), int(mine.any(1).sum())
        total += HIDDEN * min(pairs * dtype.itemsize, rows * acc)
    return total


def check_errors(comm) -> None:
    """Bad arguments raise on every rank before any MPI call (the next round then still works)."""
    world = comm.world_size
    for bad in (0, -4) + ((world + 1,) if world > 1 else ()):
        try:
            comm.expert_router(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"num_experts={bad} accepted with W={world}")
    router = comm.expert_router(2 * world)
    h, ids, w = torch.zeros(3, HIDDEN), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
    cases = [
        (ValueError, (h, ids + 2 * world, w)),
        (ValueError, (h, ids - 1, w)),
        (ValueError, (h, ids[:2], w[:2])),
        (ValueError, (h, ids, w[:, :1])),
        (TypeError, (h, ids.float(), w)),
        (TypeError, (h, ids, w.long())),
        (ValueError, (h[0], ids, w)),
    ]
    for exc, args in cases:
        try:
            router.dispatch(*args)
        except exc:
            pass
        else:
            raise AssertionError(f"dispatch accepted bad arguments, expected {exc.__name__}")
    for exc, call in ((ValueError, lambda: router.combine(torch.zeros(0, HIDDEN))),):
        try:
            call()
        except exc:
            pass
        else:
            raise AssertionError("combine before dispatch accepted")
    recv = router.dispatch(h, ids, w)
    try:
        router.combine(torch.zeros(recv.hidden_states.shape[0] + 1, HIDDEN))
    except ValueError:
        pass
    else:
        raise AssertionError("combine with the wrong row count accepted")
    router.combine(recv.hidden_states)


def main() -> int:
    world_comm = MPI.COMM_WORLD
    world = world_comm.Get_size()
    for staging in (False, True):
        comm = mpicomm.MPICommunicator(world_comm, timeout=60, staging=staging, validate=staging)
        check_errors(comm)
        for backend in ("sparse_alltoallv", "allgather_reducescatter"):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for k in (1, 2, 3, 8):  # k=8: combine links carry per-token sums
                    e = 4 * world
                    # Experts 1 and e-1 (and rank 0's expert 0 too, when k is even) get no tokens.
                    used = [i for i in range(e) if i not in (1, e - 1)]
                    if k == 2:
                        used.remove(0)
                    # Rank 1 has no tokens (at W=1: rank 0, when k=3).
                    empty = 1 if world > 1 else (0 if k == 3 else -1)
                    check_round(comm, backend, e, k, dtype, 100 * k + world, used, empty)
        comm.destroy()

    # The manager interface: the backend name picks the router; router-logit dispatch still works.
    comm = mpicomm.MPICommunicator(world_comm, all2all_backend="sparse_alltoallv", timeout=60)
    assert isinstance(comm.all2all_manager.router(world), ExpertRouter)
    assert isinstance(comm.all2all_manager.get_handle({"num_experts": world}), ExpertRouter)
    h = torch.full((2, 3), float(comm.rank))
    gathered, _ = comm.dispatch(h, torch.zeros(2, 4))
    assert gathered.shape == (2 * world, 3)
    assert torch.equal(comm.combine(gathered), h * world)
    comm.destroy()
    comm = mpicomm.MPICommunicator(world_comm, timeout=60)
    assert isinstance(comm.all2all_manager.router(world), GatheredRouter)
    comm.destroy()

    # The expert-parallel group of initialize_model_parallel (two EP groups at W=4 with PP=2).
    layouts = {1: {}, 2: {"tensor_parallel_size": 2}, 3: {"data_parallel_size": 3}}
    layouts[4] = {"pipeline_parallel_size": 2, "tensor_parallel_size": 2}
    groups = mpicomm.initialize_model_parallel(
        **layouts[world], enable_expert_parallel=True, timeout=60
    )
    ep = groups.ep
    assert ep is not None and ep.world_size == (2 if world == 4 else world)
    for backend in ("sparse_alltoallv", "allgather_reducescatter"):
        check_round(ep, backend, 8 * ep.world_size, 2, torch.float32, 7 + ep.ranks[0], [0, 3, 5])
    groups.destroy()
    print(f"ALL2ALL OK rank {world_comm.Get_rank()} of {world}", flush=True)
    example = Path(__file__).resolve().parents[2] / "examples" / "moe_layer.py"
    return runpy.run_path(str(example))["main"]([])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)  # a failed rank must not leave the others waiting
