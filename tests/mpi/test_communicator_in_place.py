"""The communicator calls a front end writing into its caller's tensors needs (the
torch.distributed backend, docs/distributed.md): an in-place sum, a broadcast into ``out``, a
barrier, and a communicator that adopts its ``cpu_group`` -- on shared memory and on MPI alike."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import mpicomm
from tests.helpers import everywhere, same_bits_everywhere

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


@pytest.fixture(scope="module", params=["shm", "mpi"])
def comm(request):
    torch.set_num_threads(1)
    c = mpicomm.MPICommunicator(WORLD, unique_name="inplace", shm=request.param == "shm")
    yield c
    c.destroy()


def mine(shape, dtype, rank=RANK):
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randn(shape, generator=g).to(dtype)


def summed(got, shape, dtype) -> bool:
    """16-bit floats: the rank-order float32 sum rounded once, to the bit; wider floats: MPI may
    add in another order (same bits on every rank, checked apart)."""
    want = rank_order_sum(shape, dtype)
    if dtype.itemsize < 4:
        return torch.equal(got, want)
    return torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def rank_order_sum(shape, dtype):
    acc = torch.zeros(shape, dtype=torch.float32 if dtype.itemsize < 4 else dtype)
    for r in range(SIZE):
        acc = acc + mine(shape, dtype, r).to(acc.dtype)
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [1, 1000, 70_000])
def test_in_place_sum_writes_the_input_and_returns_it(comm, dtype, numel):
    x = mine((numel,), dtype)
    address = x.data_ptr()
    y = comm.all_reduce(x, out=x)
    ok = y is x and x.data_ptr() == address and summed(x, (numel,), dtype)
    assert everywhere(ok)
    assert same_bits_everywhere(x)


def test_in_place_sum_of_a_view_writes_only_the_view(comm):
    base = torch.zeros(4, 6)
    view = base[:, ::2]
    view.copy_(mine((4, 3), torch.float32))
    comm.all_reduce(view, out=view)
    ok = summed(view, (4, 3), torch.float32)
    assert everywhere(ok and torch.equal(base[:, 1::2], torch.zeros(4, 3)))


def test_broadcast_into_out(comm):
    ok = True
    for src in range(SIZE):
        x = mine((3, 5), torch.float32)
        y = comm.broadcast(x, src, out=x)  # in place, as torch.distributed broadcasts
        ok &= y is x and torch.equal(x, mine((3, 5), torch.float32, src))
        base = torch.zeros(3, 10)
        other = base[:, ::2]  # a non-contiguous out, not the input
        y = comm.broadcast(mine((3, 5), torch.float32), src, out=other)
        ok &= y is other and torch.equal(other, mine((3, 5), torch.float32, src))
        ok &= torch.equal(base[:, 1::2], torch.zeros(3, 5))
    assert everywhere(ok)
    with pytest.raises(ValueError, match="out has shape"):
        comm.broadcast(torch.ones(3), 0, out=torch.ones(4))


def test_barrier_waits_for_every_rank(comm):
    import time

    start = time.monotonic()
    if RANK == 0:
        time.sleep(0.3)
    comm.barrier()
    waited = time.monotonic() - start
    assert everywhere(SIZE == 1 or waited >= 0.25)


def test_adopted_cpu_group_carries_the_payload_and_is_freed_by_destroy():
    own = WORLD.Dup()
    c = mpicomm.MPICommunicator(own, unique_name="adopted", own_cpu_group=True)
    x = torch.ones(3)
    c.all_reduce(x, out=x)
    ok = c.device_group is own and torch.equal(x, torch.full((3,), float(SIZE)))
    c.destroy()
    assert everywhere(ok and own == MPI.COMM_NULL)


def test_validated_barrier_against_another_call_raises_on_every_rank():
    if SIZE < 2:
        pytest.skip("needs two ranks")
    c = mpicomm.MPICommunicator(WORLD, unique_name="checked", validate=True, timeout=30)
    with pytest.raises(ValueError, match="disagree on operation"):
        if RANK == 0:
            c.barrier()
        else:
            c.broadcast(torch.ones(2), 0)
    c.destroy()
