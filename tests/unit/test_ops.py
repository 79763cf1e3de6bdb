"""mpicomm's torch custom operators (mpicomm.ops): fake shapes, eager results, torch.compile.

One process, as everything in tests/unit: the operators run on a one-rank communicator (the
collectives' multi-rank results are tested in tests/mpi/).
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch._subclasses.fake_tensor import FakeTensorMode

import mpicomm
from mpicomm import ops

torch.set_num_threads(1)

W = MPI.COMM_WORLD.Get_size()
R = MPI.COMM_WORLD.Get_rank()


@pytest.fixture(scope="module")
def comm():
    c = mpicomm.MPICommunicator(cpu_group=MPI.COMM_WORLD, unique_name="ops-test")
    name = ops.register_communicator(c)
    assert name == "ops-test"
    yield c
    ops.unregister_communicator(name, c)
    c.destroy()


def data(rank: int, shape, dtype=torch.float32, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(101 * rank + salt)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-50, 50, shape, generator=g).to(dtype)


# ---------------------------------------------------------------- registry (local, no MPI)
def test_registry_rejects_a_second_communicator_under_a_taken_name():
    a, b = object(), object()
    ops.register_communicator(a, "reg-test")
    try:
        assert ops.register_communicator(a, "reg-test") == "reg-test"  # same object: fine
        with pytest.raises(ValueError, match="reg-test"):
            ops.register_communicator(b, "reg-test")
        ops.unregister_communicator("reg-test", b)  # not b's: kept
        assert ops.get_communicator("reg-test") is a
        ops.register_communicator(b, "reg-test", replace=True)
        assert ops.get_communicator("reg-test") is b
    finally:
        ops.unregister_communicator("reg-test")
    with pytest.raises(KeyError, match="reg-test"):
        ops.get_communicator("reg-test")


def test_registry_name_must_be_a_nonempty_string():
    with pytest.raises(TypeError):
        ops.register_communicator(object(), "")


# ---------------------------------------------------------------- fake implementations
@pytest.mark.parametrize(
    ("call", "shape"),
    [
        (lambda x: torch.ops.mpicomm.all_reduce(x, "nobody"), (6, 4)),
        (lambda x: torch.ops.mpicomm.all_gather(x, 0, 3, "nobody"), (18, 4)),
        (lambda x: torch.ops.mpicomm.all_gather(x, -1, 3, "nobody"), (6, 12)),
        (lambda x: torch.ops.mpicomm.reduce_scatter(x, 0, 3, "nobody"), (2, 4)),
        (lambda x: torch.ops.mpicomm.reduce_scatter(x, 1, 2, "nobody"), (6, 2)),
        (lambda x: torch.ops.mpicomm.all_gatherv(x, [6, 1, 2], "nobody"), (9, 4)),
        (lambda x: torch.ops.mpicomm.reduce_scatterv(x, 0, [1, 5], 1, "nobody"), (5, 4)),
        (lambda x: torch.ops.mpicomm.broadcast(x, 0, "nobody"), (6, 4)),
    ],
)
def test_fake_implementations_give_the_output_shape_without_a_communicator(call, shape):
    with FakeTensorMode():
        x = torch.empty(6, 4, dtype=torch.bfloat16)
        y = call(x)
    assert tuple(y.shape) == shape
    assert y.dtype == torch.bfloat16
    assert y.is_contiguous()


# ---------------------------------------------------------------- eager, against the communicator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_eager_ops_equal_the_communicator(comm, dtype):
    x = data(R, (2 * W, 3), dtype)
    before = x.clone()
    checks = [
        (ops.all_reduce(x, "ops-test"), comm.all_reduce(x)),
        (ops.all_gather(x, "ops-test", dim=0), comm.all_gather(x, 0)),
        (ops.reduce_scatter(x, "ops-test", dim=0), comm.reduce_scatter(x, 0)),
        (ops.broadcast(x, "ops-test", src=W - 1), comm.broadcast(x, W - 1)),
    ]
    sizes = [i + 1 for i in range(W)]
    rows = data(R, (sizes[R], 2), dtype, 7)
    checks.append((ops.all_gatherv(rows, sizes, "ops-test"), comm.all_gatherv(rows, 0, sizes)))
    full = data(R, (sum(sizes), 2), dtype, 9)
    checks.append(
        (ops.reduce_scatterv(full, sizes, "ops-test", dim=0), comm.reduce_scatterv(full, 0, sizes))
    )
    for got, want in checks:
        assert got.dtype == dtype
        assert torch.equal(got, want)
    assert torch.equal(x, before)
    # and the values are the reference ones, not just self-consistent
    every = [data(r, (2 * W, 3), dtype) for r in range(W)]
    assert torch.equal(checks[1][0], torch.cat(every, 0))


def test_real_ops_check_world_size_and_rank(comm):
    x = torch.ones(2 * W, 2)
    with pytest.raises(ValueError, match="world_size"):
        torch.ops.mpicomm.all_gather(x, 0, W + 1, "ops-test")
    with pytest.raises(ValueError, match="rank"):
        torch.ops.mpicomm.reduce_scatterv(x, 0, [2] * W, (R + 1) % (W + 1) + W, "ops-test")


@pytest.mark.parametrize(
    "op",
    ["all_reduce", "all_gather", "reduce_scatter", "all_gatherv", "reduce_scatterv", "broadcast"],
)
def test_opcheck(comm, op):
    """torch.library.opcheck: schema, fake-vs-real shapes, AOT dispatch (real collectives run;
    every rank runs the same sequence)."""
    x = data(R, (2 * W, 4), torch.float32, 3)
    args = {
        "all_reduce": (x, "ops-test"),
        "all_gather": (x, 0, W, "ops-test"),
        "reduce_scatter": (x, 0, W, "ops-test"),
        "all_gatherv": (x, [2 * W] * W, "ops-test"),
        "reduce_scatterv": (x, 0, [2] * W, R, "ops-test"),
        "broadcast": (x, 0, "ops-test"),
    }[op]
    torch.library.opcheck(getattr(torch.ops.mpicomm, op).default, args)


# ---------------------------------------------------------------- torch.compile(fullgraph=True)
def model(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ w)
    h = ops.all_reduce(h, "ops-test")
    g = ops.all_gather(h * 2, "ops-test", dim=0)
    s = ops.reduce_scatter(g.float(), "ops-test", dim=0)
    return s.sum(dim=-1, keepdim=True) + ops.broadcast(h, "ops-test", src=0)[:, :1]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(comm, backend):
    torch._dynamo.reset()
    x = data(R, (4, 8), torch.float32, 11)
    w = data(0, (8, 5), torch.float32, 12)
    eager = model(x, w)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = compiled(x, w)  # fullgraph=True: any graph break raises
    assert got.shape == eager.shape
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    # a second call with new values reuses the graph and stays correct
    x2 = data(R, (4, 8), torch.float32, 13)
    torch.testing.assert_close(compiled(x2, w), model(x2, w), rtol=1e-5, atol=1e-5)
