"""Hierarchical collectives on one host, with the node split faked by ``node_of(rank)``.

The ``mpi``-marked tests run inside ``mpiexec -n N python -m pytest --with-mpi``; scripts/test.sh
runs this file with the rest of tests/mpi at 1, 2, 3 and 4 ranks (bounded by timeouts). Every rank builds every rank's input
from a seed, so the reference needs no communication.
"""

from __future__ import annotations

import pytest
import torch

from mpicomm import hierarchical

MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
TINY_ULP = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}

# node layouts, as functions of (rank, world)
LAYOUTS = {
    "blocks": lambda r, w: r // 2,  # 0 0 1 1 (the usual: consecutive ranks per node)
    "interleaved": lambda r, w: r % 2,  # 0 1 0 1
    "lonely-first": lambda r, w: 0 if r == 0 else 1,  # 0 1 1 1
    "one-node": lambda r, w: 0,
    "one-rank-per-node": lambda r, w: r,
    "labels": lambda r, w: 7 * (w - r),  # arbitrary labels, nodes in reverse label order
}


def make_input(rank: int, shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def within_one_ulp(result: torch.Tensor, exact: torch.Tensor) -> bool:
    """``result`` (16-bit float) is within one ulp of ``exact`` (float64)."""
    _, exp = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), exp - 1 - MANTISSA[result.dtype])
    ulp = ulp.clamp(min=TINY_ULP[result.dtype])
    return bool(((result.double() - exact).abs() <= ulp).all())


@pytest.fixture(scope="module")
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def split_for(comm, layout: str):
    w = comm.Get_size()
    return hierarchical.split_nodes(comm, node_of=lambda r: LAYOUTS[layout](r, w))


def same_bits_everywhere(comm, t: torch.Tensor) -> bool:
    mine = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return all(b == mine for b in comm.allgather(mine))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_nodes(comm, layout):
    split = split_for(comm, layout)
    try:
        w, r = comm.Get_size(), comm.Get_rank()
        labels = [LAYOUTS[layout](i, w) for i in range(w)]
        first = {lab: labels.index(lab) for lab in labels}  # node = order of its lowest rank
        order = sorted(set(labels), key=first.get)
        assert split.node_of == tuple(order.index(lab) for lab in labels)
        mates = [i for i in range(w) if labels[i] == labels[r]]
        assert (split.local_rank, split.local_size) == (mates.index(r), len(mates))
        assert split.num_nodes == len(order)
        assert split.is_leader == (r == mates[0])
        assert (split.leaders.Get_size() == len(order)) if split.is_leader else True
    finally:
        split.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_reduce(comm, layout, dtype):
    w, r = comm.Get_size(), comm.Get_rank()
    split = split_for(comm, layout)
    try:
        for shape in [(1000,), (3, 5, 7), (), (0,), (1,), (2, 3)]:
            inputs = [make_input(i, shape, dtype, seed=len(shape)) for i in range(w)]
            x = inputs[r].clone()
            out = hierarchical.all_reduce(x, split)
            assert torch.equal(x, inputs[r])  # input untouched
            assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
            assert out.numel() == 0 or out.data_ptr() != x.data_ptr()
            exact = torch.stack([t.double() for t in inputs]).sum(0)
            if dtype in (torch.float16, torch.bfloat16):
                assert within_one_ulp(out, exact), shape
            else:
                torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
            assert same_bits_everywhere(comm, out), shape
    finally:
        split.free()


@pytest.mark.mpi(min_size=2)
def test_all_reduce_fp16_rounded_once(comm):
    """Values whose fp16 partial sums would round: only a single final rounding is exact."""
    w, r = comm.Get_size(), comm.Get_rank()
    split = split_for(comm, "blocks")
    try:
        # 1 + k * 2^-11 style: each term is half an fp16 ulp of 1.0; pairwise fp16 sums would
        # round to even and lose them, fp32 accumulation keeps them.
        x = torch.full((64,), 2.0**-11 if r else 1.0, dtype=torch.float16)
        out = hierarchical.all_reduce(x, split)
        exact = torch.tensor(1.0 + (w - 1) * 2.0**-11, dtype=torch.float64)
        assert torch.equal(out, exact.to(torch.float16).expand(64))
    finally:
        split.free()


@pytest.mark.mpi(min_size=2)
def test_all_reduce_noncontiguous(comm):
    w, r = comm.Get_size(), comm.Get_rank()
    split = split_for(comm, "interleaved")
    try:
        inputs = [make_input(i, (6, 4), torch.float32, seed=3) for i in range(w)]
        out = hierarchical.all_reduce(inputs[r].t(), split)
        torch.testing.assert_close(out, torch.stack(inputs).sum(0).t())
    finally:
        split.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", ["blocks", "interleaved", "labels", "one-node"])
def test_all_gather(comm, layout):
    w, r = comm.Get_size(), comm.Get_rank()
    split = split_for(comm, layout)
    try:
        for dtype in [torch.bool, torch.int8, torch.int64, torch.bfloat16, torch.complex64]:
            for shape in [(3, 4), (), (0, 2)]:
                inputs = [make_input(i, shape, dtype, seed=5) for i in range(w)]
                x = inputs[r].clone()
                out = hierarchical.all_gather(x, split)
                assert torch.equal(out, torch.stack(inputs)), (dtype, shape)
                assert torch.equal(x, inputs[r])
    finally:
        split.free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", ["blocks", "interleaved", "lonely-first", "labels"])
def test_reduce_scatter(comm, layout):
    w, r = comm.Get_size(), comm.Get_rank()
    split = split_for(comm, layout)
    try:
        for dtype in [torch.bfloat16, torch.float16, torch.float32]:
            for counts in [[(3 * i + 1) % 5 for i in range(w)], [100] * w]:  # uneven, zeros
                n = sum(counts)
                inputs = [make_input(i, (n,), dtype, seed=9) for i in range(w)]
                x = inputs[r].clone()
                out = hierarchical.reduce_scatter(x, counts, split)
                start = sum(counts[:r])
                exact = torch.stack([t.double() for t in inputs]).sum(0)[start : start + counts[r]]
                assert out.shape == (counts[r],) and out.dtype == dtype
                if dtype == torch.float32:
                    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
                else:
                    assert within_one_ulp(out, exact), (dtype, counts)
                assert torch.equal(x, inputs[r])
    finally:
        split.free()


@pytest.mark.mpi(min_size=2)
def test_rejects_bad_arguments(comm):
    split = split_for(comm, "blocks")
    try:
        with pytest.raises(TypeError, match="input_"):
            hierarchical.all_reduce(torch.ones(4, dtype=torch.int32), split)
        with pytest.raises(TypeError, match="input_"):
            hierarchical.all_gather([1, 2], split)
        with pytest.raises(ValueError, match="counts"):
            hierarchical.reduce_scatter(torch.ones(4), [4] * comm.Get_size(), split)
    finally:
        split.free()
    with pytest.raises(ValueError, match="node_of"):
        hierarchical.split_nodes(comm, node_of=lambda r: -1)


@pytest.mark.mpi(min_size=2)
def test_communicator_uses_hierarchy(comm, monkeypatch):
    """MPICommunicator.all_reduce goes through the hierarchy when the split spans nodes
    (``hierarchical`` is what MPICOMM_HIERARCHICAL sets at construction)."""
    import mpicomm

    calls = []
    real = hierarchical.all_reduce

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hierarchical, "all_reduce", spy)
    c = mpicomm.MPICommunicator(cpu_group=comm)
    try:
        c._node_split = split_for(c.device_group, "interleaved")  # 2 nodes at any size
        w, r = comm.Get_size(), comm.Get_rank()
        for how, nbytes, expect in [("1", 8, True), ("0", 1 << 20, False), ("auto", 8, False)]:
            c.hierarchical = how
            calls.clear()
            n = nbytes // 2
            inputs = [make_input(i, (n,), torch.bfloat16, seed=11) for i in range(w)]
            out = c.all_reduce(inputs[r])
            assert bool(calls) == expect, (how, nbytes)
            assert within_one_ulp(out, torch.stack([t.double() for t in inputs]).sum(0))
        c.hierarchical = "auto"
        monkeypatch.setattr(hierarchical, "AUTO_MIN_PER_NODE", 2)
        calls.clear()
        n = hierarchical.ALLREDUCE_FROM // 2
        for dtype in (torch.bfloat16, torch.float32):
            calls.clear()
            out = c.all_reduce(torch.full((n,), float(r), dtype=dtype))
            # auto: 16-bit floats, where every node holds AUTO_MIN_PER_NODE (here 2) ranks
            assert len(calls) == (w >= 4 and dtype == torch.bfloat16), dtype
            assert torch.equal(out, torch.full((n,), w * (w - 1) / 2, dtype=dtype))
    finally:
        c.destroy()
