"""MoE routing in one process: the routers at W = 1 and their argument checks (at W = 1..4
under mpiexec: tests/jobs/test_moe.py)."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpicomm
from mpicomm.moe import ExpertRouter, GatheredRouter


@pytest.fixture(scope="module")
def comm():
    c = mpicomm.MPICommunicator(MPI.COMM_SELF, timeout=30)
    yield c
    c.destroy()


def test_router_names_and_manager(comm):
    assert isinstance(comm.expert_router(4), ExpertRouter)
    assert isinstance(comm.expert_router(4, backend="allgather_reducescatter"), GatheredRouter)
    with pytest.raises(ValueError, match="backend"):
        comm.expert_router(4, backend="nope")
    with pytest.raises(ValueError, match="num_experts"):
        comm.expert_router(0)
    with pytest.raises(TypeError, match="num_experts"):
        comm.expert_router(2.0)
    sparse = mpicomm.MPICommunicator(MPI.COMM_SELF, all2all_backend="sparse_alltoallv")
    try:
        assert isinstance(sparse.all2all_manager.router(3), ExpertRouter)
    finally:
        sparse.destroy()


@pytest.mark.parametrize("backend", ["sparse_alltoallv", "allgather_reducescatter"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_matches_dense(comm, backend, dtype):
    """W=1: every pair stays local; the output is sum_j w_j * expert_j(x)."""
    g = torch.Generator().manual_seed(0)
    num_experts, n, k, hidden = 6, 7, 2, 5
    x = torch.randn(n, hidden, generator=g).to(dtype)
    ids = torch.randint(0, num_experts, (n, k), generator=g)
    w = torch.rand(n, k, generator=g)
    scale = torch.arange(1, num_experts + 1, dtype=torch.float32)
    router = comm.expert_router(num_experts, backend=backend)
    recv = router.dispatch(x, ids, w)
    assert recv.hidden_states.shape == (n * k, hidden)
    out = router.combine((recv.hidden_states.float() * scale[recv.expert_ids, None]).to(dtype))
    want = ((x.float()[:, None, :] * scale[ids][..., None]).to(dtype).float() * w[..., None]).sum(1)
    assert out.dtype == dtype
    torch.testing.assert_close(out, want.to(dtype), rtol=1e-5, atol=1e-5)
    assert router.last_bytes == {"dispatch": 0, "combine": 0}


def test_rejects_bad_arguments_before_mpi(comm):
    router = comm.expert_router(4)
    x, ids, w = torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int64), torch.ones(3, 1)
    with pytest.raises(ValueError, match="topk_ids"):
        router.dispatch(x, ids + 4, w)
    with pytest.raises(TypeError, match="topk_ids"):
        router.dispatch(x, ids.float(), w)
    with pytest.raises(ValueError, match="topk_weights"):
        router.dispatch(x, ids, torch.ones(3, 2))
    with pytest.raises(ValueError, match="hidden_states"):
        router.dispatch(x.reshape(-1), ids, w)
    with pytest.raises(ValueError, match="before dispatch"):
        router.combine(x)
    router.dispatch(x, ids, w)
    with pytest.raises(TypeError, match="expert_output"):
        router.combine(torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="expert_output"):
        router.combine(torch.zeros(4, 2))


@pytest.mark.parametrize("backend", ["sparse_alltoallv", "allgather_reducescatter"])
def test_noncontiguous_inputs_fresh_results(comm, backend):
    """Strided inputs are accepted, never mutated, and results share no memory with them."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=g, dtype=torch.float16)
    x = base[:, ::2]  # (6, 5), not contiguous
    ids = torch.randint(0, 4, (3, 6), generator=g, dtype=torch.int32).t()  # (6, 3) transposed
    w = torch.rand(3, 6, generator=g).t()
    saved = [t.clone() for t in (x, ids, w)]
    router = comm.expert_router(4, backend=backend)
    recv = router.dispatch(x, ids, w)
    y = recv.hidden_states * 2
    out = router.combine(y)
    for before, after in zip(saved, (x, ids, w), strict=True):
        assert torch.equal(before, after)
    assert recv.hidden_states.data_ptr() != x.data_ptr() and out.data_ptr() != y.data_ptr()
    want = (2 * x.float() * w.sum(1, keepdim=True)).to(torch.float16)
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
