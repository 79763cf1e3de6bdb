"""Bad input raises the documented exception on every rank, before any MPI call (so no rank is
left waiting), and MPI failures surface as CommunicationError naming operation and group."""

import pytest
import torch
from mpi4py import MPI

import mpicomm
from tests.helpers import everywhere

pytestmark = pytest.mark.mpi


def raises(exc, fn, *args, match=None, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        return match is None or match in str(e)
    return False


def test_not_a_tensor(comm):
    assert everywhere(raises(TypeError, comm.all_reduce, [1.0, 2.0], match="input_"))
    assert everywhere(raises(TypeError, comm.broadcast, 3, match="tensor"))


def test_unsupported_dtype(comm):
    x = torch.zeros(2, dtype=torch.complex32)
    assert everywhere(raises(TypeError, comm.all_gather, x, match="complex32"))


def test_dim_out_of_range(comm):
    x = torch.zeros(2, 3)
    assert everywhere(raises(ValueError, comm.all_gather, x, 2, match="dim=2"))
    assert everywhere(raises(ValueError, comm.reduce_scatter, x, -3, match="dim=-3"))
    assert everywhere(raises(TypeError, comm.gather, x, 0, 1.0, match="dim"))


def test_reduce_scatter_not_divisible(comm):
    x = torch.zeros(2, comm.world_size + 1)
    expect = comm.world_size > 1
    assert everywhere(raises(ValueError, comm.reduce_scatter, x) == expect)


def test_reduce_scatterv_bad_sizes(comm):
    w = comm.world_size
    x = torch.zeros(4, 2 * w)
    assert everywhere(raises(ValueError, comm.reduce_scatterv, x, -1, [2] * (w + 1), match="sizes"))
    assert everywhere(raises(ValueError, comm.reduce_scatterv, x, -1, [1] * w, match="adds up"))
    assert everywhere(raises(ValueError, comm.reduce_scatterv, x, 0, [-1] + [0] * (w - 1)))
    assert everywhere(raises(TypeError, comm.reduce_scatterv, x, 0, "abc", match="sizes"))


def test_size_errors_name_the_argument_the_expected_and_the_given(comm):
    """Sizes that do not fit the tensor say which argument, what it should be and what it is."""
    w = comm.world_size
    x = torch.zeros(4, 2 * w)
    if w > 1:
        uneven = torch.zeros(2, w + 1)
        text = f"input_.shape[1]={w + 1} is not divisible by the group size {w}"
        assert everywhere(raises(ValueError, comm.reduce_scatter, uneven, 1, match=text))
    text = f"sizes adds up to {w}, but input_.shape[1] is {2 * w}: they must be equal"
    assert everywhere(raises(ValueError, comm.reduce_scatterv, x, -1, [1] * w, match=text))
    text = f"send_rows adds up to {3 * w}, but input_.shape[0] is 4"
    assert everywhere(raises(ValueError, comm.all_to_allv, x, [3] * w, [4] * w, match=text))


def test_dispatch_and_combine_name_their_bad_arguments():
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="moe_errors")
    try:
        x = torch.ones(4, 3)
        text = "extra_tensors must be a list of tensors or None, got Tensor"
        assert everywhere(raises(TypeError, c.dispatch, x, x, extra_tensors=x, match=text))
        # bool("maybe") would be True: a yes/no argument takes a bool or a flag's spelling
        text = "is_sequence_parallel"
        assert everywhere(
            raises(ValueError, c.dispatch, x, x, is_sequence_parallel="maybe", match=text)
        )
        assert everywhere(raises(TypeError, c.dispatch, x, x, is_sequence_parallel=[], match=text))
        c.dispatch(x, x)
        text = f"hidden_states has 3 rows, but the last dispatch returned {4 * c.world_size}"
        assert everywhere(raises(ValueError, c.combine, torch.ones(3, 3), match=text))
        text = "is_sequence_parallel"
        rows = torch.ones(4 * c.world_size, 3)
        assert everywhere(
            raises(ValueError, c.combine, rows, is_sequence_parallel="maybe", match=text)
        )
        assert everywhere(torch.equal(c.combine(rows, is_sequence_parallel="no"), x * c.world_size))
    finally:
        c.destroy()


def test_all_gatherv_bad_arguments(comm):
    w, r = comm.world_size, comm.rank
    x = torch.zeros(2, 3)
    assert everywhere(raises(ValueError, comm.all_gatherv, x, 1, match="dim=0"))
    assert everywhere(raises(ValueError, comm.all_gatherv, x, 0, [3] * w, match=f"sizes[{r}]"))
    assert everywhere(raises(ValueError, comm.all_gatherv, [x, torch.zeros(3, 3)], 0))
    assert everywhere(raises(TypeError, comm.all_gatherv, [], 0))


def test_bad_ranks(comm):
    w = comm.world_size
    x = torch.zeros(2)
    assert everywhere(raises(ValueError, comm.gather, x, w, match="dst"))
    assert everywhere(raises(ValueError, comm.broadcast, x, -1, match="src"))
    assert everywhere(raises(ValueError, comm.send, x, w, match="dst"))
    assert everywhere(raises(ValueError, comm.recv, (2,), torch.float32, w, match="src"))
    assert everywhere(raises(TypeError, comm.recv, (2,), "float32", match="dtype"))
    assert everywhere(raises(ValueError, comm.recv, (-1,), torch.float32, match="size"))


def test_combine_before_dispatch():
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD)
    try:
        assert everywhere(raises(ValueError, c.combine, torch.zeros(2, 2), match="dispatch"))
    finally:
        c.destroy()


def test_recv_wrong_size_raises_and_consumes(comm):
    w, r = comm.world_size, comm.rank
    if w == 1:
        pytest.skip("needs two ranks")
    ok = True
    if r == 0:
        comm.send(torch.arange(5, dtype=torch.float32), dst=1)
        comm.send(torch.arange(4, dtype=torch.float32), dst=1)
    elif r == 1:
        ok = raises(mpicomm.CommunicationError, comm.recv, (4,), torch.float32, 0, match="20 bytes")
        # the oversized message was consumed: the next receive gets the next message
        ok = ok and torch.equal(comm.recv((4,), torch.float32, 0), torch.arange(4.0))
    assert everywhere(ok)


def test_destroyed_communicator_raises():
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="gone")
    c.destroy()
    c.destroy()  # idempotent
    assert everywhere(raises(mpicomm.CommunicationError, c.all_reduce, torch.ones(1), match="gone"))


def test_device_group_checks():
    same = MPI.COMM_WORLD
    assert everywhere(raises(ValueError, mpicomm.MPICommunicator, same, device_group=same))
    if same.Get_size() > 1:
        flipped = same.Split(0, -same.Get_rank())
        try:
            ok = raises(
                ValueError, mpicomm.MPICommunicator, same, device_group=flipped, match="order"
            )
        finally:
            flipped.Free()
        assert everywhere(ok)


def test_bad_constructor_arguments():
    assert everywhere(raises(TypeError, mpicomm.MPICommunicator, "world", match="cpu_group"))
    assert everywhere(raises(ValueError, mpicomm.MPICommunicator, MPI.COMM_WORLD, "nodevice:0"))
    assert everywhere(raises(ValueError, mpicomm.MPICommunicator, MPI.COMM_WORLD, timeout=-1))
    assert everywhere(
        raises(ValueError, mpicomm.MPICommunicator, MPI.COMM_WORLD, allreduce_algo="ring")
    )
    assert everywhere(
        raises(ValueError, mpicomm.MPICommunicator, MPI.COMM_WORLD, all2all_backend="nccl")
    )


def test_yes_no_and_model_arguments_are_checked():
    # bool("no") is True: initialize_model_parallel takes a bool or a flag's spelling, alike on
    # every rank (its arguments are exchanged before any group is made)
    text = "enable_expert_parallel"
    assert everywhere(
        raises(
            ValueError,
            mpicomm.initialize_model_parallel,
            enable_expert_parallel="maybe",
            match=text,
        )
    )
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="prepare_errors")
    try:
        text = "model must be a torch.nn.Module, got int"
        assert everywhere(
            raises(TypeError, c.prepare_communication_buffer_for_model, 3, match=text)
        )
        c.prepare_communication_buffer_for_model(torch.nn.Linear(2, 2))
    finally:
        c.destroy()
