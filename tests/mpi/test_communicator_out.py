"""``out=`` of all_gather, all_gatherv, reduce_scatter(v) and gather (what the torch.distributed backend writes
its callers' tensors with, docs/distributed.md): the result equals the fresh call's, lands in
``out`` (contiguous, a strided view, or memory shared with the input) and ``out`` is returned;
the input is never changed; a bad ``out`` raises on every rank before any MPI call (the
communicator stays usable) -- on shared memory and on MPI alike, at sizes of the hot path and
of the general one.

    timeout 600 mpiexec -n 3 python -m pytest --with-mpi -q tests/mpi/test_communicator_out.py
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpicomm
from tests.helpers import everywhere

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
TIMEOUT = 60.0
# rows: within the hot path's one round, and a message past the direct-read threshold
ROWS = [3, 70_000]


@pytest.fixture(scope="module", params=["shm", "mpi"])
def comm(request):
    torch.set_num_threads(1)
    c = mpicomm.MPICommunicator(
        WORLD, unique_name="out", shm=request.param == "shm", timeout=TIMEOUT
    )
    yield c
    c.destroy()


def mine(shape, dtype=torch.float32, rank=RANK):
    g = torch.Generator().manual_seed(70 + rank)
    return (torch.randn(shape, generator=g) * 8).round().to(dtype)  # sums exact in any order


def strided(shape, dtype):
    """An ``out`` of ``shape`` that is every other column of a zeroed buffer, and the buffer."""
    base = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
    return base[..., ::2], base


def _cases(comm, call, x, shape, dtype):
    """``(ok, untouched)``: ``call(out)`` into a fresh contiguous tensor and into a strided view
    equals ``call(None)``, returns ``out``, and leaves ``x`` and the view's gaps as they were."""
    before = x.clone()
    want = call(None)
    out = torch.empty(shape, dtype=dtype)
    got = call(out)
    ok = got is out and torch.equal(out, want) if want is not None else got is None
    view, base = strided(shape, dtype)
    got = call(view)
    if want is not None:
        ok = ok and got is view and torch.equal(view, want) and not base[..., 1::2].any()
    return ok and torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_all_gather_into_out(comm, dtype, rows, dim):
    x = mine((rows, 4), dtype) if dim == 0 else mine((4, rows), dtype)
    shape = list(x.shape)
    shape[dim] *= SIZE
    ok = _cases(comm, lambda out: comm.all_gather(x, dim, out=out), x, shape, dtype)
    want = torch.cat([mine(tuple(x.shape), dtype, r) for r in range(SIZE)], dim)
    assert everywhere(ok and torch.equal(comm.all_gather(x, dim), want))


@pytest.mark.parametrize("rows", ROWS)
def test_all_gather_in_place_of_its_own_block(comm, rows):
    """torch.distributed's in-place form: the input is this rank's block of ``out``."""
    out = torch.zeros(SIZE * rows, 4)
    block = out[RANK * rows : (RANK + 1) * rows]
    block.copy_(mine((rows, 4)))
    got = comm.all_gather(block, 0, out=out)
    want = torch.cat([mine((rows, 4), rank=r) for r in range(SIZE)])
    assert everywhere(got is out and torch.equal(out, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [0, 1])
def test_reduce_scatter_into_out(comm, dtype, rows, dim):
    x = mine((SIZE * rows, 3), dtype) if dim == 0 else mine((3, SIZE * rows), dtype)
    shape = list(x.shape)
    shape[dim] = rows
    ok = _cases(comm, lambda out: comm.reduce_scatter(x, dim, out=out), x, shape, dtype)
    total = sum(mine(tuple(x.shape), torch.float64, r) for r in range(SIZE)).to(dtype)
    want = total.chunk(SIZE, dim)[RANK]
    assert everywhere(ok and torch.equal(comm.reduce_scatter(x, dim), want))


def test_reduce_scatterv_into_out(comm):
    sizes = [r + 1 for r in range(SIZE)]
    x = mine((sum(sizes), 5))
    shape = (sizes[RANK], 5)
    ok = _cases(comm, lambda out: comm.reduce_scatterv(x, 0, sizes, out=out), x, shape, x.dtype)
    assert everywhere(ok)


def test_reduce_scatter_into_out_sharing_the_input(comm):
    """``out`` is the start of the input (read and written in one call): through fresh memory."""
    x = mine((SIZE * 4, 2))
    want = comm.reduce_scatter(x.clone(), 0)
    got = comm.reduce_scatter(x, 0, out=x[:4])
    assert everywhere(torch.equal(got, want) and torch.equal(x[:4], want))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [0, 1])
def test_gather_into_out(comm, rows, dim):
    x = mine((rows, 2)) if dim == 0 else mine((2, rows))
    shape = list(x.shape)
    shape[dim] *= SIZE
    ok = True
    for dst in range(SIZE):
        ok &= _cases(comm, lambda out, d=dst: comm.gather(x, d, dim, out=out), x, shape, x.dtype)
        untouched = torch.full(shape, 5.0)
        got = comm.gather(x, dst, dim, out=untouched)
        ok &= got is untouched if dst == RANK else got is None and bool((untouched == 5).all())
    assert everywhere(ok)


@pytest.mark.parametrize("rows", ROWS)
def test_all_gatherv_into_out(comm, rows):
    """One tensor (rank r has r + rows rows) and a list of two (another dtype and trailing
    shape): each result in its ``out``, the list's outs returned as a list."""
    sizes = [r + rows for r in range(SIZE)]
    x = mine((sizes[RANK], 3))
    ok = _cases(
        comm, lambda out: comm.all_gatherv(x, 0, sizes, out=out), x, (sum(sizes), 3), x.dtype
    )
    y = mine((sizes[RANK],), torch.int64)
    want = comm.all_gatherv([x, y], 0, sizes)
    outs = [torch.empty(sum(sizes), 3), torch.empty(sum(sizes), dtype=torch.int64)]
    got = comm.all_gatherv([x, y], 0, sizes, out=outs)
    ok = ok and got[0] is outs[0] and got[1] is outs[1]
    ok = ok and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    with pytest.raises(TypeError, match="one per input"):
        comm.all_gatherv([x, y], 0, sizes, out=outs[:1])
    assert everywhere(ok)


def _bad_outs(shape):
    n = shape[0]
    return [
        (torch.empty(n + 1, *shape[1:]), ValueError),
        (torch.empty(shape, dtype=torch.float64), ValueError),
        (torch.empty(shape).numpy(), TypeError),
        (torch.empty(shape, requires_grad=True), ValueError),
    ]


def test_bad_out_raises_on_every_rank_before_mpi(comm):
    """Each rank refuses alone (no rank waits in a collective), and the next call works."""
    x = torch.ones(4, 3)
    calls = {
        "all_gather": (lambda out: comm.all_gather(x, 0, out=out), (4 * SIZE, 3)),
        "reduce_scatter": (lambda out: comm.reduce_scatter(x.repeat(SIZE, 1), 0, out=out), (4, 3)),
        "reduce_scatterv": (
            lambda out: comm.reduce_scatterv(x.repeat(SIZE, 1), 0, [4] * SIZE, out=out),
            (4, 3),
        ),
        "gather": (lambda out: comm.gather(x, 0, 0, out=out), (4 * SIZE, 3)),
        "all_gatherv": (lambda out: comm.all_gatherv(x, 0, [4] * SIZE, out=out), (4 * SIZE, 3)),
    }
    raised = []
    for name, (call, shape) in calls.items():
        for out, error in _bad_outs(shape):
            try:
                call(out)
            except error:
                raised.append(name)
            else:
                raised.append(f"{name}: nothing raised")
    ok = raised == [name for name in calls for _ in range(4)]
    ok = ok and torch.equal(comm.all_gather(x, 0), torch.ones(4 * SIZE, 3))
    assert everywhere(ok)
