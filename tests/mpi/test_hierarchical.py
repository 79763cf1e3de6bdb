"""The hierarchical all_reduce on one host, with the node split faked by ``node_of(rank)``.

The ``mpi``-marked tests run inside ``mpiexec -n N python -m pytest --with-mpi``; scripts/test.sh
runs this file with the rest of tests/mpi at 1, 2, 3 and 4 ranks (bounded by timeouts). Every rank builds every rank's input
from a seed, so the reference needs no communication.
"""

from __future__ import annotations

import pytest
import torch

from mpicomm import hierarchical, plan, topology
from tests.helpers import same_bits_everywhere

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


def record_calls(monkeypatch, name: str, what=lambda args, kwargs: 1) -> list:
    """Wrap ``hierarchical.<name>`` for the test: each call appends ``what(args, kwargs)`` to the
    returned list, then runs the real function."""
    calls, real = [], getattr(hierarchical, name)

    def spy(*args, **kwargs):
        calls.append(what(args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(hierarchical, name, spy)
    return calls


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


def node_of(layout: str, world: int):
    return lambda r: LAYOUTS[layout](r, world)


def hier_comm(comm, layout: str, shm: str = "0"):
    """A communicator whose node split follows ``layout`` and that always takes the hierarchical
    all_reduce where it applies (as MPICOMM_HIERARCHICAL=1 would). Shared memory is off unless
    ``shm="auto"``: a layout that puts every rank on one node must still test the MPI paths; with
    it, the node-local steps of a split group run in each node's segment."""
    import mpicomm

    c = mpicomm.MPICommunicator(cpu_group=comm, node_of=node_of(layout, comm.Get_size()), shm=shm)
    c.hierarchical = "1"
    return c


def assert_sum_of(inputs: list[torch.Tensor], out: torch.Tensor, dtype, label) -> None:
    """``out`` is the sum of ``inputs`` of ``dtype`` (16-bit floats within one ulp of the exact
    sum, wider ones close to it), with the same bits on every rank."""
    exact = torch.stack([t.double() for t in inputs]).sum(0)
    if dtype in (torch.float16, torch.bfloat16):
        assert within_one_ulp(out, exact), label
    else:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
    assert same_bits_everywhere(out), label


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_nodes(comm, layout):
    labels_ = topology.node_labels(comm, node_of(layout, comm.Get_size()))
    split = topology.NodeSplit.create(comm, labels_)
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
@pytest.mark.parametrize("node_memory", ["0", "auto"], ids=["node-mpi", "node-shm"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_reduce(comm, layout, dtype, node_memory):
    w, r = comm.Get_size(), comm.Get_rank()
    c = hier_comm(comm, layout, node_memory)
    try:
        for shape in [(1000,), (3, 5, 7), (), (0,), (1,), (2, 3)]:
            inputs = [make_input(i, shape, dtype, seed=len(shape)) for i in range(w)]
            x = inputs[r].clone()
            spans_nodes = len(set(c.node_of)) > 1
            assert (c.all_reduce_algorithm(x) == plan.HIERARCHICAL) == spans_nodes
            out = c.all_reduce(x)
            assert torch.equal(x, inputs[r])  # input untouched
            assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
            assert out.numel() == 0 or out.data_ptr() != x.data_ptr()
            assert_sum_of(inputs, out, dtype, shape)
    finally:
        c.destroy()


@pytest.mark.mpi(min_size=2)
def test_all_reduce_fp16_rounded_once(comm):
    """Values whose fp16 partial sums would round: only a single final rounding is exact."""
    w, r = comm.Get_size(), comm.Get_rank()
    c = hier_comm(comm, "blocks")
    try:
        # 1 + k * 2^-11 style: each term is half an fp16 ulp of 1.0; pairwise fp16 sums would
        # round to even and lose them, fp32 accumulation keeps them.
        x = torch.full((64,), 2.0**-11 if r else 1.0, dtype=torch.float16)
        out = c.all_reduce(x)
        exact = torch.tensor(1.0 + (w - 1) * 2.0**-11, dtype=torch.float64)
        assert torch.equal(out, exact.to(torch.float16).expand(64))
    finally:
        c.destroy()


@pytest.mark.mpi(min_size=2)
def test_all_reduce_noncontiguous(comm):
    w, r = comm.Get_size(), comm.Get_rank()
    c = hier_comm(comm, "interleaved")
    try:
        inputs = [make_input(i, (6, 4), torch.float32, seed=3) for i in range(w)]
        assert c.all_reduce_algorithm(inputs[r].t()) == plan.HIERARCHICAL
        out = c.all_reduce(inputs[r].t())
        torch.testing.assert_close(out, torch.stack(inputs).sum(0).t())
        assert out.is_contiguous()
    finally:
        c.destroy()


@pytest.mark.mpi(min_size=2)
def test_rejects_bad_arguments(comm):
    with pytest.raises(ValueError, match="node_of"):
        topology.node_labels(comm, node_of=lambda r: -1)
    c = hier_comm(comm, "blocks")
    try:
        # Integers never take the hierarchy (it sums floats only): the flat path handles them.
        assert c.all_reduce_algorithm(torch.ones(4, dtype=torch.int32)) == plan.NATIVE
        out = c.all_reduce(torch.ones(4, dtype=torch.int32))
        assert torch.equal(out, torch.full((4,), comm.Get_size(), dtype=torch.int32))
    finally:
        c.destroy()


@pytest.mark.mpi(min_size=2)
def test_communicator_uses_hierarchy(comm, monkeypatch):
    """MPICommunicator.all_reduce goes through the hierarchy when the split spans nodes
    (``hierarchical`` is what MPICOMM_HIERARCHICAL sets at construction)."""
    import mpicomm

    calls = record_calls(monkeypatch, "all_reduce")
    interleaved = node_of("interleaved", comm.Get_size())  # 2 nodes at any size
    c = mpicomm.MPICommunicator(cpu_group=comm, node_of=interleaved)
    try:
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
        monkeypatch.setattr(plan, "AUTO_MIN_PER_NODE", 2)
        calls.clear()
        n = plan.HIERARCHICAL_FROM // 2
        # the two-dimensional sum: two nodes of equal size (2+) with node segments
        two_level = (
            w >= 4 and w % 2 == 0 and c.transport is None and c._engine.node_transport is not None
        )
        for dtype in (torch.bfloat16, torch.float32):
            calls.clear()
            out = c.all_reduce(torch.full((n,), float(r), dtype=dtype))
            # auto: 16-bit floats, where every node holds AUTO_MIN_PER_NODE (here 2) ranks
            assert len(calls) == (w >= 4 and (dtype == torch.bfloat16 or two_level)), dtype
            assert torch.equal(out, torch.full((n,), w * (w - 1) / 2, dtype=dtype))
    finally:
        c.destroy()


@pytest.mark.mpi(min_size=3)
def test_node_local_steps_use_shared_memory(comm, monkeypatch):
    """Where a node holds 2+ of the group's ranks, the hierarchy's node-local steps get that
    node's shared-memory transport (none with ``shm="0"``, none for a node of one rank)."""
    from mpicomm.shm import built

    if not built():
        pytest.skip("the compiled core mpicomm.shm._core is not built")
    # the node's transport: all_reduce's last parameter, ``local``
    seen = record_calls(
        monkeypatch, "all_reduce", lambda a, k: a[-1] if len(a) > 7 else k.get("local")
    )
    w, r = comm.Get_size(), comm.Get_rank()
    for shm, layout in (("auto", "lonely-first"), ("0", "lonely-first")):
        c = hier_comm(comm, layout, shm)
        try:
            seen.clear()
            inputs = [make_input(i, (4099,), torch.bfloat16, seed=5) for i in range(w)]
            out = c.all_reduce(inputs[r])
            assert within_one_ulp(out, torch.stack([t.double() for t in inputs]).sum(0))
            assert same_bits_everywhere(out)
            shared = seen[0] is not None
            assert shared == (shm == "auto" and r > 0), (shm, r)  # rank 0 is alone on its node
        finally:
            c.destroy()


@pytest.mark.mpi(min_size=4)
@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_two_level(comm, layout, dtype, monkeypatch):
    """Nodes of 2 ranks, each with a segment: the two-dimensional sum runs (at 4 ranks two nodes,
    at 6 three), for sizes that the ranks do not divide, below one element per rank, and large
    enough for the segment's direct reads; special values keep identical bits everywhere."""
    from mpicomm.shm import built

    w, r = comm.Get_size(), comm.Get_rank()
    if w % 2 or not built():
        pytest.skip("needs an even number of ranks and the compiled core")
    ran = record_calls(monkeypatch, "_two_level")
    c = hier_comm(comm, layout, "auto")
    try:
        for n in (1, 2, 3, 5, 7, 4097, 65537, 300_001):
            ran.clear()
            inputs = [make_input(i, (n,), dtype, seed=n) for i in range(w)]
            out = c.all_reduce(inputs[r])
            assert ran, n
            assert_sum_of(inputs, out, dtype, n)
        x = make_input(r, (4101,), dtype, seed=1)
        x[r :: 3 * w] = float("nan") if r % 2 else float("inf")
        x[7 :: 5 * w] = -float("inf")
        out = c.all_reduce(x)
        assert same_bits_everywhere(out)
        assert out.isnan().any() and out.isinf().any()
    finally:
        c.destroy()
