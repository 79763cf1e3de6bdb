"""DeviceCommunicatorBase's derived defaults, through a minimal subclass that provides only the
primitives (as a communicator written for another transport would): every derived collective must
equal its definition at any rank count."""

import pytest
import torch
from mpi4py import MPI

import mpicomm

pytestmark = pytest.mark.mpi


class PickleCommunicator(mpicomm.DeviceCommunicatorBase):
    """The five primitives over mpi4py's pickle API: slow, obviously correct."""

    def all_reduce(self, input_):
        return sum(self.cpu_group.allgather(input_.clone()))

    def all_gather(self, input_, dim=-1):
        return torch.cat(self.cpu_group.allgather(input_.clone()), dim)

    def send(self, tensor, dst=None):
        self.cpu_group.send(
            tensor.clone(), (self.rank + 1) % self.world_size if dst is None else dst
        )

    def recv(self, size, dtype, src=None):
        src = (self.rank - 1) % self.world_size if src is None else src
        return self.cpu_group.recv(source=src)

    def broadcast(self, tensor, src=0):
        return self.cpu_group.bcast(tensor.clone(), root=src)


@pytest.fixture(scope="module")
def base():
    return PickleCommunicator(MPI.COMM_WORLD, unique_name="toy")


def every_input(world):
    return [
        torch.arange(world * 6, dtype=torch.float64).reshape(world * 2, 3) * (r + 1)
        for r in range(world)
    ]


def test_reduce_scatter(base):
    world, rank = base.world_size, base.rank
    xs = every_input(world)
    total = sum(xs)
    assert torch.equal(base.reduce_scatter(xs[rank], 0), torch.chunk(total, world, 0)[rank])
    with pytest.raises(ValueError):
        base.reduce_scatter(torch.ones(world * 2 + 1, 3), 0) if world > 1 else (
            _ for _ in ()
        ).throw(ValueError("one rank divides everything"))


def test_reduce_scatterv(base):
    world, rank = base.world_size, base.rank
    xs = every_input(world)
    sizes = [2] * world
    if world > 1:
        sizes[0], sizes[-1] = 3, 1
    got = base.reduce_scatterv(xs[rank], 0, sizes)
    start = sum(sizes[:rank])
    assert torch.equal(got, sum(xs)[start : start + sizes[rank]])
    with pytest.raises(ValueError):
        base.reduce_scatterv(xs[rank], 0, [1] * (world + 1))


def test_gather(base):
    world, rank = base.world_size, base.rank
    xs = every_input(world)
    for dst in range(world):
        got = base.gather(xs[rank], dst, 1)
        assert (got is None) == (rank != dst)
        if got is not None:
            assert torch.equal(got, torch.cat(xs, 1))
    with pytest.raises(ValueError):
        base.gather(xs[rank], world)


def test_all_gatherv_equal_sizes(base):
    world, rank = base.world_size, base.rank
    xs = every_input(world)
    assert torch.equal(base.all_gatherv(xs[rank]), torch.cat(xs, 0))
    pair = base.all_gatherv([xs[rank], xs[rank][:, :1]], 0, [world * 2] * world)
    assert torch.equal(pair[1], torch.cat([x[:, :1] for x in xs], 0))
    if world > 1:
        with pytest.raises(NotImplementedError):
            base.all_gatherv(xs[rank], 0, list(range(world)))


def test_moe_and_prepare_defaults(base):
    h, logits, extra = torch.ones(3, 4), torch.zeros(3, 2), [torch.arange(3)]
    assert base.dispatch(h, logits) == (h, logits)
    assert base.dispatch(h, logits, extra_tensors=extra) == (h, logits, extra)
    assert base.combine(h) is h
    assert base.prepare_communication_buffer_for_model(torch.nn.Linear(2, 2)) is None
    base.destroy()


def test_attributes(base):
    world = MPI.COMM_WORLD
    assert (base.rank, base.world_size) == (world.Get_rank(), world.Get_size())
    assert base.ranks == list(range(world.Get_size())) and base.device == torch.device("cpu")
    with pytest.raises(TypeError):
        PickleCommunicator(cpu_group="world")
