"""Every collective of MPICommunicator against a locally computed reference, for every dtype of
CONTRACT.md and for contiguous, transposed, empty and 0-d inputs. Written once; passes at any rank
count (run under mpiexec -n 1..4)."""

import zlib

import pytest
import torch

from mpicomm.dtypes import CHECKED, INEXACT_SUMS, NARROW_FLOATS
from tests.helpers import bits, everywhere, same_bits_everywhere

# The dtype lists come from the table (tests/unit/test_dtypes.py pins what is in them); the
# expected values below are computed here, independently of the library.
DTYPES = list(CHECKED)
LAYOUTS = ["contiguous", "transposed", "empty", "scalar"]
INEXACT = INEXACT_SUMS

pytestmark = pytest.mark.mpi


def make(dtype, rank, shape, salt=0):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{rank}{shape}{salt}".encode()))
    if dtype is torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    low = 0 if dtype is torch.uint8 else -20
    return torch.randint(low, 20, shape, generator=gen).to(dtype)


def per_rank(dtype, layout, world, shape=(4, 6), salt=0):
    """Every rank's input (so each rank can compute the reference locally)."""
    if layout == "transposed":
        return [make(dtype, i, shape[::-1], salt).t() for i in range(world)]
    if layout == "empty":
        return [make(dtype, i, (0, *shape[1:]), salt) for i in range(world)]
    if layout == "scalar":
        return [make(dtype, i, (), salt) for i in range(world)]
    return [make(dtype, i, shape, salt) for i in range(world)]


def reference_sum(xs):
    """Left-to-right sum over ranks; narrow floats in float32 rounded once; bool as or."""
    if xs[0].dtype is torch.bool:
        out = xs[0].clone()
        for x in xs[1:]:
            out = out | x
        return out
    acc_dtype = torch.float32 if xs[0].dtype in NARROW_FLOATS else xs[0].dtype
    acc = xs[0].to(acc_dtype)
    for x in xs[1:]:
        acc = acc + x.to(acc_dtype)
    return acc.to(xs[0].dtype)


def equal(result, expected):
    if result is None or result.shape != expected.shape or result.dtype != expected.dtype:
        return False
    if result.dtype in INEXACT:
        tol = 1e-5 if result.dtype in (torch.float32, torch.complex64) else 1e-12
        return torch.allclose(result, expected, rtol=tol, atol=tol)
    return bits(result) == bits(expected)


def fresh(result, source):
    return result.is_contiguous() and (
        result.numel() == 0 or result.data_ptr() != source.data_ptr()
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_reduce(comm, dtype, layout):
    xs = per_rank(dtype, layout, comm.world_size)
    mine, before = xs[comm.rank], xs[comm.rank].clone()
    out = comm.all_reduce(mine)
    ok = equal(out, reference_sum(xs)) and fresh(out, mine) and equal(mine, before)
    assert everywhere(ok)
    assert same_bits_everywhere(out)


@pytest.mark.parametrize("dim", [0, -1, 1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_gather(comm, dtype, layout, dim):
    xs = per_rank(dtype, layout, comm.world_size)
    if layout == "scalar":
        if dim == 1:
            with pytest.raises(ValueError, match="dim"):
                comm.all_gather(xs[comm.rank], dim)
            return
        xs_ref = [x.reshape(1) for x in xs]
    else:
        xs_ref = xs
    mine, before = xs[comm.rank], xs[comm.rank].clone()
    out = comm.all_gather(mine, dim)
    ok = equal(out, torch.cat(xs_ref, dim)) and fresh(out, mine) and equal(mine, before)
    assert everywhere(ok)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_gatherv_list(comm, dtype):
    world = comm.world_size
    sizes = [(i * 2) % 3 for i in range(world)]  # includes ranks with zero rows
    a = [make(dtype, i, (sizes[i], 3)) for i in range(world)]
    b = [make(torch.int32, i, (sizes[i], 2, 2)) for i in range(world)]
    out = comm.all_gatherv([a[comm.rank], b[comm.rank].transpose(1, 2)], dim=0, sizes=sizes)
    expected_b = torch.cat([x.transpose(1, 2) for x in b])
    assert everywhere(
        isinstance(out, list) and equal(out[0], torch.cat(a)) and equal(out[1], expected_b)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
def test_all_gatherv_single_tensor_equal_sizes(comm, dtype):
    xs = per_rank(dtype, "transposed", comm.world_size)
    out = comm.all_gatherv(xs[comm.rank])
    assert everywhere(isinstance(out, torch.Tensor) and equal(out, torch.cat(xs)))


@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "empty"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_scatter(comm, dtype, layout, dim):
    world = comm.world_size
    shape = (2 * world, 3 * world) if layout != "empty" else (0, 3 * world)
    if layout == "empty" and dim == 0:
        shape = (2 * world, 0)
    xs = per_rank(dtype, "transposed" if layout == "transposed" else "contiguous", world, shape)
    mine, before = xs[comm.rank], xs[comm.rank].clone()
    out = comm.reduce_scatter(mine, dim)
    expected = reference_sum(xs).chunk(world, dim)[comm.rank] if shape[dim] else reference_sum(xs)
    assert everywhere(
        equal(out, expected.contiguous()) and fresh(out, mine) and equal(mine, before)
    )


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_scatterv(comm, dtype, dim):
    world, rank = comm.world_size, comm.rank
    sizes = [(i + 1) % 3 for i in range(world)]  # zero rows for some ranks
    shape = [3, 4, 2]
    shape[dim] = sum(sizes)
    xs = per_rank(dtype, "contiguous", world, tuple(shape))
    out = comm.reduce_scatterv(xs[rank], dim, sizes)
    start = sum(sizes[:rank])
    expected = reference_sum(xs).narrow(dim, start, sizes[rank]).contiguous()
    assert everywhere(equal(out, expected))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather(comm, dtype, layout):
    dst = comm.world_size - 1
    xs = per_rank(dtype, layout, comm.world_size)
    out = comm.gather(xs[comm.rank], dst=dst, dim=-1)
    if comm.rank == dst:
        ok = equal(out, torch.cat([x.reshape(-1) if x.dim() == 0 else x for x in xs], -1))
    else:
        ok = out is None
    assert everywhere(ok)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_broadcast(comm, dtype, layout):
    src = comm.world_size // 2
    xs = per_rank(dtype, layout, comm.world_size)
    mine, before = xs[comm.rank], xs[comm.rank].clone()
    out = comm.broadcast(mine, src=src)
    assert everywhere(equal(out, xs[src]) and fresh(out, mine) and equal(mine, before))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_send_recv_ring(comm, dtype, layout):
    world, rank = comm.world_size, comm.rank
    if world == 1:
        pytest.skip("a ring needs two ranks")
    xs = per_rank(dtype, layout, world)
    if rank % 2 == 0:
        comm.send(xs[rank])
        got = comm.recv(xs[rank].shape, dtype)
    else:
        got = comm.recv(xs[rank].shape, dtype)
        comm.send(xs[rank])
    assert everywhere(equal(got, xs[(rank - 1) % world].contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dispatch_combine(comm, dtype):
    world, rank = comm.world_size, comm.rank
    sizes = [(i * 2 + 1) % 4 for i in range(world)]
    hs = [make(dtype, i, (sizes[i], 8), 1) for i in range(world)]
    logits = [make(torch.float32, i, (sizes[i], 4), 2) for i in range(world)]
    extra = [make(torch.int64, i, (sizes[i], 2), 3) for i in range(world)]
    h, lg, ex = comm.dispatch(hs[rank], logits[rank], extra_tensors=[extra[rank]])
    ok = equal(h, torch.cat(hs)) and equal(lg, torch.cat(logits)) and equal(ex[0], torch.cat(extra))
    # every rank plays the experts: scale the gathered tokens by (rank + 1)
    out = comm.combine(h * (rank + 1))
    start = sum(sizes[:rank])
    expected = reference_sum([torch.cat(hs) * (i + 1) for i in range(world)])
    ok = ok and equal(out, expected[start : start + sizes[rank]])
    # sizes given by the caller instead of exchanged
    h2, _ = comm.dispatch(hs[rank], logits[rank], sizes=sizes)
    assert everywhere(ok and equal(h2, torch.cat(hs)))


def test_attributes(comm):
    from mpi4py import MPI

    assert comm.rank == comm.rank_in_group == MPI.COMM_WORLD.Get_rank()
    assert comm.world_size == MPI.COMM_WORLD.Get_size()
    assert comm.ranks == list(range(comm.world_size))
    assert comm.global_rank == comm.rank and comm.global_world_size == comm.world_size
    assert comm.device == torch.device("cpu") and comm.unique_name == "test"
    assert MPI.Comm.Compare(comm.cpu_group, comm.device_group) == MPI.CONGRUENT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inputs_that_require_grad(comm, dtype):
    """Parameters (requires_grad=True) go through every collective; results are plain tensors,
    equal to those of the detached inputs, and the inputs keep their grad flag and values."""
    world, rank = comm.world_size, comm.rank
    xs = per_rank(dtype, "contiguous", world, shape=(world * 2, 3), salt=4)
    mine = torch.nn.Parameter(xs[rank].clone())
    outs = {
        "all_reduce": (comm.all_reduce(mine), reference_sum(xs)),
        "all_gather": (comm.all_gather(mine, 0), torch.cat(xs)),
        "all_gatherv": (comm.all_gatherv([mine])[0], torch.cat(xs)),
        "reduce_scatter": (comm.reduce_scatter(mine, 0), reference_sum(xs).chunk(world)[rank]),
        "broadcast": (comm.broadcast(mine, 0), xs[0]),
    }
    bad = [
        name
        for name, (got, want) in outs.items()
        if got.requires_grad or got.grad_fn is not None or not equal(got, want)
    ]
    ok = not bad and mine.requires_grad and equal(mine.detach(), xs[rank])
    assert everywhere(ok), bad
