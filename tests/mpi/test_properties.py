"""Property tests: random dtypes, shapes, dims, sizes and non-contiguous views, compared with a
reference computed locally. Hypothesis is derandomized so every rank draws the same examples, and
each verdict is agreed by all ranks, so a failure (and its shrinking) happens everywhere at once."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import everywhere
from tests.mpi.test_communicator import DTYPES, equal, make, reference_sum

pytestmark = pytest.mark.mpi

SETTINGS = settings(
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def build(dtype, shape, strided, rank, seed):
    """Rank ``rank``'s input; ``strided`` makes it a non-contiguous view with the same shape."""
    if strided and shape:
        wide = (*shape[:-1], 2 * shape[-1])
        return make(dtype, rank, wide, seed)[..., ::2]
    return make(dtype, rank, shape, seed)


@st.composite
def cases(draw, min_ndim=0):
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(min_ndim, 3))
    shape = [draw(st.integers(0, 4)) for _ in range(ndim)]
    span = max(ndim, 1)
    dim = draw(st.integers(-span, span - 1))
    return dtype, shape, dim, draw(st.booleans()), draw(st.integers(0, 2**20))


@SETTINGS
@given(case=cases())
def test_all_reduce_any_input(comm, case):
    dtype, shape, _, strided, seed = case
    xs = [build(dtype, tuple(shape), strided, i, seed) for i in range(comm.world_size)]
    out = comm.all_reduce(xs[comm.rank])
    assert everywhere(equal(out, reference_sum(xs)))


@SETTINGS
@given(case=cases())
def test_all_gather_any_input(comm, case):
    dtype, shape, dim, strided, seed = case
    xs = [build(dtype, tuple(shape), strided, i, seed) for i in range(comm.world_size)]
    out = comm.all_gather(xs[comm.rank], dim)
    expected = torch.cat([x.reshape(1) if x.dim() == 0 else x for x in xs], dim)
    assert everywhere(equal(out, expected))


@SETTINGS
@given(case=cases(min_ndim=1), rows=st.integers(0, 3))
def test_reduce_scatter_any_input(comm, case, rows):
    dtype, shape, dim, strided, seed = case
    world = comm.world_size
    shape[dim] = rows * world
    xs = [build(dtype, tuple(shape), strided, i, seed) for i in range(world)]
    out = comm.reduce_scatter(xs[comm.rank], dim)
    expected = reference_sum(xs).narrow(dim, rows * comm.rank, rows).contiguous()
    assert everywhere(equal(out, expected))


@SETTINGS
@given(case=cases(min_ndim=1), data=st.data())
def test_reduce_scatterv_any_sizes(comm, case, data):
    dtype, shape, dim, strided, seed = case
    world = comm.world_size
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=world, max_size=world))
    shape[dim] = sum(sizes)
    xs = [build(dtype, tuple(shape), strided, i, seed) for i in range(world)]
    out = comm.reduce_scatterv(xs[comm.rank], dim, sizes)
    start = sum(sizes[: comm.rank])
    expected = reference_sum(xs).narrow(dim, start, sizes[comm.rank]).contiguous()
    assert everywhere(equal(out, expected))


@SETTINGS
@given(case=cases(min_ndim=1), data=st.data())
def test_all_gatherv_any_sizes(comm, case, data):
    dtype, shape, _, strided, seed = case
    world = comm.world_size
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=world, max_size=world))
    xs = [build(dtype, (sizes[i], *shape[1:]), strided, i, seed) for i in range(world)]
    out = comm.all_gatherv(xs[comm.rank], 0, sizes)
    assert everywhere(equal(out, torch.cat(xs)))


@SETTINGS
@given(case=cases(), src=st.integers(0, 3))
def test_broadcast_any_input(comm, case, src):
    dtype, shape, _, strided, seed = case
    src %= comm.world_size
    xs = [build(dtype, tuple(shape), strided, i, seed) for i in range(comm.world_size)]
    assert everywhere(equal(comm.broadcast(xs[comm.rank], src), xs[src]))
