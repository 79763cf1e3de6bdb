"""The shared-memory path (mpicomm.shm) on every rank: every collective and dtype against the
reference and, bit for bit, against the MPI path (``shm="0"``) on the same inputs; sizes that
take the one-shot sum, the in-segment reduce-scatter + all-gather, and several rounds through the
double-buffered slots, and all of it again with peers' tensors read directly; identical bits on
every rank. At 1 rank the path is forced (``shm="1"``).

    timeout 600 mpiexec -n 3 python -m pytest --with-mpi -q tests/mpi/test_shm.py
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from mpicomm import CommunicationError, MPICommunicator, plan
from mpicomm.check import make_input, reference_sum
from mpicomm.shm import built
from tests import conformance
from tests.helpers import everywhere, same_bits_everywhere

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not built(), reason="the compiled core mpicomm.shm._core is not built"),
]
torch.set_num_threads(1)
TIMEOUT = 60.0
# 16-bit float sums: bit for bit with the MPI path (docs/contract.md, "Sums").
NARROW = (torch.bfloat16, torch.float16)


@pytest.fixture(scope="module", params=["direct", "slots"])
def on(request):
    """Shared memory, large messages read from peers' tensors directly (every size, to cover the
    direct path at small sizes too) or copied through the segment's slots."""
    comm = MPICommunicator(MPI.COMM_WORLD, shm="1", timeout=TIMEOUT, unique_name="shm-on")
    if request.param == "slots":
        comm.transport.direct_from = None
    elif comm.world_size > 1:
        if comm.transport.direct_from is None:
            comm.destroy()
            pytest.skip("this kernel refuses process_vm_readv between the ranks")
        comm.transport.direct_from = 0
    yield comm
    comm.destroy()


@pytest.fixture(scope="module")
def off():
    comm = MPICommunicator(MPI.COMM_WORLD, shm="0", timeout=TIMEOUT, unique_name="shm-off")
    yield comm
    comm.destroy()


def test_paths(on, off):
    x = torch.ones(3)
    assert on.transport is not None and on.all_reduce_algorithm(x) == plan.SHM
    assert off.transport is None and off.all_reduce_algorithm(x) != plan.SHM


@pytest.mark.parametrize("dtype", conformance.DTYPE_LIST, ids=conformance.DTYPE_IDS)
@pytest.mark.parametrize("name", conformance.COLLECTIVES)
def test_shm_equals_mpi_and_reference(on, off, name, dtype):
    """Every collective and dtype through shared memory matches the reference and the MPI path:
    bit for bit, except float32/64 and complex sums, which MPI may add in another order."""
    exact = dtype not in conformance.INEXACT_SUM
    differ = conformance.differences(on, off, name, dtype, "cpu", salt=11, exact=exact)
    assert not differ, f"shm and MPI results differ: {differ}"


def inputs(dtype, n, world):
    return [make_input(dtype, r, (n,), 900) for r in range(world)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
@pytest.mark.parametrize("n", [1, 1000, 20_000, 70_001, 1_300_007])
def test_all_reduce_sizes(on, off, dtype, n):
    """One-shot (small; 4-byte kinds up to 128 KiB at 2 ranks), reduce-scatter + all-gather in
    the segment (large), several rounds: rank-order sums, identical bits everywhere, bits
    identical to the MPI path for 16-bit floats."""
    xs = inputs(dtype, n, on.world_size)
    before = xs[on.rank].clone()
    got = on.all_reduce(xs[on.rank])
    ok = torch.equal(xs[on.rank], before) and got.data_ptr() != xs[on.rank].data_ptr()
    ok = ok and conformance.equal_bits(got, reference_sum(xs))
    if dtype in NARROW:
        ok = ok and conformance.equal_bits(got, off.all_reduce(xs[on.rank]))
    assert everywhere(ok)
    assert same_bits_everywhere(got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reduce_scatterv_large_uneven(on, off, dtype):
    world = on.world_size
    sizes = [300_001 + 77_777 * r for r in range(world)]
    sizes[0] = 0 if world > 1 else sizes[0]
    xs = [make_input(dtype, r, (sum(sizes), 3), 50) for r in range(world)]
    got = on.reduce_scatterv(xs[on.rank], dim=0, sizes=sizes)
    start = sum(sizes[: on.rank])
    want = reference_sum(xs)[start : start + sizes[on.rank]]
    ok = conformance.equal_bits(got, want)
    if dtype in NARROW:
        ok = ok and conformance.equal_bits(got, off.reduce_scatterv(xs[on.rank], 0, sizes))
    assert everywhere(ok)


def test_gathers_and_broadcast_large(on):
    """Messages larger than a slot stream through in rounds; zero-row ranks are fine."""
    world, rank = on.world_size, on.rank
    rows = [0 if r == 1 else 200_000 + 1000 * r for r in range(world)]
    xs = [make_input(torch.float32, r, (rows[r], 4), 70) for r in range(world)]
    ok = torch.equal(on.all_gatherv(xs[rank], sizes=rows), torch.cat(xs))
    ys = [make_input(torch.bfloat16, r, (3, 400_000), 80) for r in range(world)]
    ok = ok and torch.equal(on.all_gather(ys[rank], dim=1), torch.cat(ys, 1))
    # over 1 MiB per rank at odd offsets: a direct gather streams its own part from any address
    odd = [1_100_001 + 7 * r for r in range(world)]
    zs = [make_input(torch.int8, r, (odd[r],), 75) for r in range(world)]
    ok = ok and torch.equal(on.all_gatherv(zs[rank], sizes=odd), torch.cat(zs))
    for dst in range(world):
        g = on.gather(ys[rank], dst=dst, dim=0)
        ok = ok and (torch.equal(g, torch.cat(ys, 0)) if rank == dst else g is None)
    for src in range(world):
        ok = ok and torch.equal(on.broadcast(ys[rank], src), ys[src])
    assert everywhere(ok)


def test_many_small_calls_in_a_row(on):
    """Thousands of back-to-back calls of mixed kinds (the double buffer wraps many times)."""
    world, rank = on.world_size, on.rank
    ok = True
    for i in range(2000):
        x = torch.full((5 + i % 7,), float(rank + i), dtype=torch.float32)
        if i % 3 == 0:
            got = on.all_reduce(x)
            ok = ok and torch.equal(got, torch.full_like(x, sum(r + i for r in range(world))))
        elif i % 3 == 1:
            got = on.all_gather(x, dim=0)
            want = torch.cat([torch.full_like(x, float(r + i)) for r in range(world)])
            ok = ok and torch.equal(got, want)
        else:
            ok = ok and torch.equal(on.broadcast(x, i % world), torch.full_like(x, i % world + i))
    assert everywhere(ok)


def test_environment_setting_off(monkeypatch):
    monkeypatch.setenv("MPICOMM_SHM", "0")
    comm = MPICommunicator(MPI.COMM_WORLD, unique_name="shm-env-off")
    try:
        assert comm.transport is None
        assert torch.equal(comm.all_reduce(torch.ones(2)), torch.full((2,), comm.world_size * 1.0))
    finally:
        comm.destroy()


def test_direct_setting_off(monkeypatch):
    monkeypatch.setenv("MPICOMM_SHM_DIRECT", "0")
    comm = MPICommunicator(MPI.COMM_WORLD, shm="1", unique_name="shm-direct-off")
    try:
        assert comm.transport.direct_from is None
        x = torch.ones(1 << 18)
        assert torch.equal(comm.all_reduce(x), torch.full_like(x, comm.world_size))
    finally:
        comm.destroy()


@pytest.mark.parametrize("n", [7, 1_300_007])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.complex64])
def test_all_reduce_out(on, off, dtype, n):
    """``out=``: in place (out is the input), into another tensor, into a non-contiguous view and
    into a view overlapping the input (both through a fresh result); shared memory and MPI give
    the same bits, and ``out`` is what is returned."""
    world, rank = on.world_size, on.rank
    xs = inputs(dtype, n, world)
    want = reference_sum(xs)
    ok = True
    for comm in (on, off):
        # MPI may add float32 and complex sums in another order than rank order
        exact = comm is on or dtype not in conformance.INEXACT_SUM

        def same(got, exact=exact):
            return (
                conformance.equal_bits(got, want) if exact else torch.allclose(got, want, atol=1e-5)
            )

        mine = xs[rank].clone()
        ok = ok and comm.all_reduce(mine, out=mine) is mine and same(mine)
        other = torch.empty_like(mine)
        got = comm.all_reduce(xs[rank], out=other)
        ok = ok and got is other and same(other)
        wide = torch.zeros(n, 2, dtype=dtype)
        comm.all_reduce(xs[rank], out=wide[:, 1])
        ok = ok and same(wide[:, 1]) and not wide[:, 0].any()
        both = torch.cat([xs[rank], xs[rank][:1]])
        comm.all_reduce(both[:n], out=both[1:])
        ok = ok and same(both[1:])
        ok = ok and torch.equal(xs[rank], inputs(dtype, n, world)[rank])
    assert everywhere(ok)


def test_all_reduce_bad_out_raises_everywhere(on):
    x = torch.ones(4)
    for out, error in (
        (torch.ones(5), ValueError),
        (torch.ones(4, dtype=torch.float64), ValueError),
        ([0.0] * 4, TypeError),
        (torch.ones(4, requires_grad=True), ValueError),
    ):
        with pytest.raises(error):
            on.all_reduce(x, out=out)
    assert torch.equal(on.all_reduce(x), torch.full_like(x, on.world_size))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_hot_path_takes_only_plain_host_tensors(on):
    """``sum_fresh`` (the per-call hot path) returns ``None`` without waiting for anything but a
    plain dense contiguous host tensor of a real dtype; every other input still sums correctly or
    raises the same error on every rank through the general path."""
    world, shm = on.world_size, on.transport
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    awkward = {
        "negative view": z.conj().imag,  # a real tensor with the lazy negative bit
        "strided": torch.arange(8.0)[::2],
        "complex": z,
        "parameter": torch.nn.Parameter(torch.ones(3)),
        "int8 view": torch.arange(6, dtype=torch.int8).view(2, 3).t(),
    }
    ok = all(shm.sum_fresh(x) is None for x in awkward.values())  # no wait: rank-local
    for x in awkward.values():
        got = on.all_reduce(x)
        want = reference_sum([x.detach().resolve_neg().resolve_conj()] * world)
        ok = ok and got.is_contiguous() and not got.requires_grad
        ok = ok and conformance.equal_bits(got, want)
    plain = torch.arange(5.0)
    ok = ok and torch.equal(shm.sum_fresh(plain), plain * world)
    assert everywhere(ok)
    for bad in (torch.ones(3).to_sparse(), torch.nested.nested_tensor([torch.ones(2)]), [1.0]):
        assert shm.sum_fresh(bad) is None
        with pytest.raises(TypeError):
            on.all_reduce(bad)


def test_hot_path_allocation_failure_keeps_ranks_in_step(on):
    """A small sum publishes its input before allocating the result: when that allocation fails
    on one rank, it raises there, its peers still get the full sum, and the next call is in step."""
    x = torch.arange(6.0) + on.rank
    want = reference_sum([torch.arange(6.0) + r for r in range(on.world_size)])
    hot = on.transport.sum_fresh
    ok = in_step_after_failure(on, lambda: hot(x), want, small=fails_once(torch.empty_like))
    assert everywhere(ok and torch.equal(on.all_reduce(x), want))


def test_hot_path_refuses_a_call_from_its_allocation(on):
    """A collective on the same group from inside the result's allocation (a finalizer, say) is
    refused on every rank, and the group stays usable."""
    shm = on.transport

    def calls_back(x):
        on.all_reduce(torch.ones(1))
        return torch.empty_like(x)

    direct = shm.direct_from
    shm.direct_from = None
    shm._hot_config(small=calls_back)
    try:
        with pytest.raises(RuntimeError, match="one call at a time"):
            shm.sum_fresh(torch.ones(4))
    finally:
        shm._hot_config()
        shm.direct_from = direct
    assert everywhere(torch.equal(on.all_reduce(torch.ones(4)), torch.full((4,), on.world_size)))


def slots_only(shm):
    """Context: the transport copies through its slots at every size (the hot paths' ground)."""

    class _Slots:
        def __enter__(self):
            self.saved = shm.direct_from
            shm.direct_from = None

        def __exit__(self, *exc):
            shm.direct_from = self.saved

    return _Slots()


def fails_once(allocate):
    """An allocator that raises MemoryError on its first call and is ``allocate`` after."""
    calls = []

    def allocator(*args):
        calls.append(args)
        if len(calls) == 1:
            raise MemoryError("no memory for the result")
        return allocate(*args)

    return allocator


def in_step_after_failure(on, hot, want, **allocators) -> bool:
    """Whether, with rank 0's first allocation failing inside ``hot()`` (the transport's hot
    paths given ``allocators``, slots only), rank 0 raised MemoryError, its peers got ``want``,
    and the next call got ``want`` everywhere."""
    shm = on.transport
    with slots_only(shm):
        if on.rank == 0:
            shm._hot_config(**allocators)
        try:
            try:
                got = hot()
                ok = on.rank != 0 and torch.equal(got, want)
            except MemoryError:
                ok = on.rank == 0
            return ok and torch.equal(hot(), want)
        finally:
            shm._hot_config()


def rank_tensor(shape, dtype, rank):
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float64).reshape(shape) % 7 + 10 * rank).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.complex64])
@pytest.mark.parametrize("shape,dim", [((5,), 0), ((3, 4), -1), ((3, 4), 0), ((2, 3, 5), 1)])
def test_gather_hot_path(on, dtype, shape, dim):
    """``gather_fresh`` (the hot path of a small all_gather) gives ``torch.cat`` along ``dim`` of
    every rank's tensor, fresh and contiguous, the input untouched; ``all_gather`` agrees."""
    world, shm = on.world_size, on.transport
    xs = [rank_tensor(shape, dtype, r) for r in range(world)]
    want = torch.cat(xs, dim)
    x = xs[on.rank].clone()
    with slots_only(shm):
        got = shm.gather_fresh(x, dim)
    ok = got is not None and got.dtype == dtype and got.is_contiguous()
    ok = ok and torch.equal(got, want) and torch.equal(x, xs[on.rank])
    ok = ok and got.data_ptr() != x.data_ptr()
    ok = ok and torch.equal(on.all_gather(x, dim), want)
    assert everywhere(ok)


def test_gather_hot_path_declines(on):
    """What the gather hot path does not take returns ``None`` without waiting; all_gather then
    gathers it through the general path, or raises the same error on every rank."""
    world, shm = on.world_size, on.transport
    z = torch.tensor([1 + 2j, 3 - 1j])
    declined = {
        "strided": (torch.arange(8.0)[::2], 0),
        "0-d": (torch.tensor(3.0), 0),
        "conjugate view": (z.conj(), 0),
        "negative view": (z.conj().imag, 0),
        "bool dim": (torch.ones(3), True),
        "dim out of range": (torch.ones(3), 1),
        "huge dim": (torch.ones(3), 1 << 70),
        "empty": (torch.ones(0), 0),
        "past one round": (torch.ones((1 << 20) // 4 + 1), 0),
    }
    with slots_only(shm):
        ok = all(shm.gather_fresh(x, dim) is None for x, dim in declined.values())
    for name in ("strided", "conjugate view", "negative view"):
        x, dim = declined[name]
        want = torch.cat([x.resolve_neg().resolve_conj()] * world, dim)
        ok = ok and torch.equal(on.all_gather(x, dim), want)
    assert everywhere(ok)
    with pytest.raises(ValueError):
        on.all_gather(torch.ones(3), 1)


def test_gather_hot_path_allocation_failure_keeps_ranks_in_step(on):
    """The gather publishes its input before allocating the result: when that fails on one rank,
    it raises there, its peers still get the full gather, and the next call is in step."""
    x = torch.arange(4.0) + on.rank
    want = torch.cat([torch.arange(4.0) + r for r in range(on.world_size)])
    hot = on.transport.gather_fresh
    ok = in_step_after_failure(on, lambda: hot(x, 0), want, new=fails_once(torch.Tensor.new_empty))
    assert everywhere(ok and torch.equal(on.all_gather(x, 0), want))


def uneven(world):
    """Rows per rank, all different, one of them 0 when there are 3 or more ranks."""
    return [0 if r == 1 and world > 2 else r + 2 for r in range(world)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("split", ["even", "uneven"])
@pytest.mark.parametrize("inner", [(), (3,)])
def test_scatter_hot_path(on, dtype, split, inner):
    """``scatter_fresh`` (the hot path of a small reduce_scatter(v) along dim 0) gives this rank's
    rows of the rank-order sum, fresh, the input untouched; the general path agrees."""
    world, shm = on.world_size, on.transport
    sizes = [2] * world if split == "even" else uneven(world)
    shape = (sum(sizes), *inner)
    xs = [rank_tensor(shape, dtype, r) for r in range(world)]
    start = sum(sizes[: on.rank])
    want = reference_sum(xs)[start : start + sizes[on.rank]]
    x = xs[on.rank].clone()
    arg = None if split == "even" else sizes
    with slots_only(shm):
        got = shm.scatter_fresh(x, 0, arg, "reduce_scatterv")
    ok = got is not None and got.shape == want.shape and got.is_contiguous()
    ok = ok and conformance.equal_bits(got, want) and torch.equal(x, xs[on.rank])
    general = on.reduce_scatter(x, 0) if split == "even" else on.reduce_scatterv(x, 0, sizes)
    ok = ok and conformance.equal_bits(general, want)
    assert everywhere(ok)


def test_scatter_hot_path_declines(on):
    """What the reduce_scatter hot path does not take returns ``None`` without waiting; the
    general path then sums it, or raises the same error on every rank."""
    world, shm = on.world_size, on.transport
    x = torch.ones(2 * world, 2 * world)
    declined = {
        "dim 1": (x, 1, None),
        "huge dim": (x, 1 << 70, None),
        "strided": (torch.ones(4 * world)[::2], 0, None),
        "complex": (torch.ones(2 * world, dtype=torch.complex64), 0, None),
        "sizes short": (x, 0, [2 * world] + [0] * (world - 1) + [0]),
        "sizes off": (x, 0, [1] * world),
        "bool size": (x, 0, [True] * world),
        "past one round": (torch.ones(world * (1 << 20)), 0, None),
    }
    if world > 1:
        declined["not divisible"] = (torch.ones(2 * world + 1), 0, None)
    with slots_only(shm):
        ok = all(
            shm.scatter_fresh(t, d, s, "reduce_scatter") is None for t, d, s in declined.values()
        )
    for name in ("dim 1", "strided", "complex"):
        t, d, _ = declined[name]
        want = torch.chunk(t.resolve_neg() * world, world, d)[on.rank]
        ok = ok and torch.equal(on.reduce_scatter(t, d), want)
    assert everywhere(ok)
    with pytest.raises(ValueError):
        on.reduce_scatterv(x, 0, [1] * world)


def test_scatter_hot_path_allocation_failure_keeps_ranks_in_step(on):
    """The reduce_scatter publishes its input before allocating the result: when that fails on
    one rank, it raises there, its peers still get their sums, and the next call is in step."""
    world = on.world_size
    x = torch.arange(2.0 * world) + on.rank
    want = reference_sum([torch.arange(2.0 * world) + r for r in range(world)])
    want = want[2 * on.rank : 2 * on.rank + 2]
    hot = on.transport.scatter_fresh
    new = fails_once(torch.Tensor.new_empty)
    ok = in_step_after_failure(on, lambda: hot(x, 0, None, "reduce_scatter"), want, new=new)
    assert everywhere(ok and torch.equal(on.reduce_scatter(x, 0), want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
@pytest.mark.parametrize("split", ["same", "uneven"])
@pytest.mark.parametrize("inner", [(), (3,)])
def test_gatherv_hot_path(on, dtype, split, inner):
    """``gatherv_fresh`` (the hot path of a small all_gatherv along dim 0) gives every rank's rows
    in rank order, fresh, the input untouched; the general path agrees."""
    world, shm = on.world_size, on.transport
    sizes = [2] * world if split == "same" else uneven(world)
    xs = [rank_tensor((sizes[r], *inner), dtype, r) for r in range(world)]
    want = torch.cat(xs)
    x = xs[on.rank].clone()
    arg = None if split == "same" else sizes
    with slots_only(shm):
        got = shm.gatherv_fresh(x, 0, arg)
    ok = got is not None and got.dtype == dtype and got.is_contiguous()
    ok = ok and torch.equal(got, want) and torch.equal(x, xs[on.rank])
    ok = ok and torch.equal(on.all_gatherv(x, 0, sizes), want)
    assert everywhere(ok)


def test_hot_paths_write_into_out(on):
    """Given ``out`` (the result's shape and dtype, plain, contiguous, apart from the input), the
    three hot paths write the result there and return it, allocating nothing; any other ``out``
    makes them return ``None`` without waiting (the general path then checks it)."""
    world, shm, rank = on.world_size, on.transport, on.rank
    room = torch.zeros(2, 2 * world + 2, 3)  # each input at the start of its row
    x = room[0, :2].copy_(rank_tensor((2, 3), torch.float32, rank))
    gathered = torch.cat([rank_tensor((2, 3), torch.float32, r) for r in range(world)])
    big = room[1, : 2 * world].copy_(rank_tensor((2 * world, 3), torch.float32, rank))
    summed = reference_sum([rank_tensor((2 * world, 3), torch.float32, r) for r in range(world)])
    hot = {
        "gather": (lambda out: shm.gather_fresh(x, 0, out), x, (2 * world, 3), gathered),
        "gatherv": (lambda out: shm.gatherv_fresh(x, 0, None, out), x, (2 * world, 3), gathered),
        "scatter": (
            lambda out: shm.scatter_fresh(big, 0, None, "reduce_scatter", out),
            big,
            (2, 3),
            summed[2 * rank : 2 * rank + 2],
        ),
    }
    made = []

    def new(t, shape):
        made.append(shape)
        return t.new_empty(shape)

    ok = True
    shm._hot_config(new=new)
    try:
        with slots_only(shm):
            for call, x_in, shape, want in hot.values():
                out = torch.empty(shape)
                ok = ok and call(out) is out and torch.equal(out, want)
                declined = [
                    torch.empty(shape[0] + 1, 3),
                    torch.empty(shape, dtype=torch.float64),
                    torch.empty(shape[1], shape[0]).t(),
                    torch.empty(shape, requires_grad=True),
                    list(shape),
                    room[0 if x_in is x else 1, : shape[0]],  # memory the input starts
                ]
                ok = ok and all(call(bad) is None for bad in declined)
    finally:
        shm._hot_config()
    assert everywhere(ok and not made)


def test_gatherv_hot_path_declines(on):
    """What the all_gatherv hot path does not take returns ``None`` without waiting; the general
    path then gathers it, or raises the same error on every rank."""
    world, shm = on.world_size, on.transport
    x = torch.ones(2, 3)
    declined = {
        "list": ([x], 0, None),
        "dim 1": (x, 1, None),
        "huge dim": (x, 1 << 70, None),
        "huge size": (x, 0, [1 << 70] * world),
        "strided": (torch.ones(4, 3)[::2], 0, None),
        "this rank's size off": (x, 0, [3] * world),
        "sizes short": (x, 0, [2] * (world + 1)),
        "bool size": (x, 0, [True] * world),
        "0-d": (torch.tensor(1.0), 0, None),
        "past one round": (torch.ones((1 << 20) // 4 + 1), 0, None),
    }
    with slots_only(shm):
        ok = all(shm.gatherv_fresh(t, d, s) is None for t, d, s in declined.values())
    ok = ok and all(torch.equal(g, torch.ones(2 * world, 3)) for g in on.all_gatherv([x], 0, None))
    ok = ok and torch.equal(on.all_gatherv(declined["strided"][0], 0), torch.ones(2 * world, 3))
    assert everywhere(ok)
    with pytest.raises(ValueError):
        on.all_gatherv(x, 0, [3] * world)


def test_gatherv_hot_path_allocation_failure_keeps_ranks_in_step(on):
    """The all_gatherv publishes its rows before allocating the result: when that fails on one
    rank, it raises there, its peers still get every rank's rows, and the next call is in step."""
    x = torch.full((2,), float(on.rank))
    want = torch.cat([torch.full((2,), float(r)) for r in range(on.world_size)])
    hot = on.transport.gatherv_fresh
    new = fails_once(torch.Tensor.new_empty)
    ok = in_step_after_failure(on, lambda: hot(x, 0, None), want, new=new)
    assert everywhere(ok and torch.equal(on.all_gatherv(x, 0), want))


def _ones(n, dtype=torch.float32):
    return torch.ones(n, dtype=dtype)


def _sizes(world, odd, rows=2):
    """Rows per rank as one rank sees them: the odd rank believes rank 0 has one more."""
    return [rows + (odd and r == 0) for r in range(world)]


# Calls on which the last rank (odd=True) disagrees with the others (docs/shm.md, "Calls that
# disagree"): one rank, op(comm, odd, rank, world), validation off. Sizes cover the hot paths,
# the one-shot / in-segment / several-round / direct paths, and one rank on each of two paths.
MISMATCHES = {
    "all_reduce-hot": lambda c, odd, r, w: c.all_reduce(_ones(5 if odd else 4)),
    "all_reduce-hot-vs-large": lambda c, odd, r, w: c.all_reduce(_ones(300_000 if odd else 100)),
    "all_reduce-large": lambda c, odd, r, w: c.all_reduce(_ones(300_000 if odd else 70_000)),
    "all_reduce-dtype": lambda c, odd, r, w: c.all_reduce(_ones(4, torch.int64 if odd else None)),
    "all_reduce-general": lambda c, odd, r, w: c.all_reduce(
        _ones(7 if odd else 6), out=torch.empty(7 if odd else 6)
    ),
    "all_gather-hot": lambda c, odd, r, w: c.all_gather(_ones(5 if odd else 4), 0),
    "all_gather-large": lambda c, odd, r, w: c.all_gather(_ones(300_000 if odd else 290_000), 0),
    "all_gatherv-hot": lambda c, odd, r, w: c.all_gatherv(
        _ones((_sizes(w, odd)[r], 3)), 0, _sizes(w, odd)
    ),
    "all_gatherv-large": lambda c, odd, r, w: c.all_gatherv(
        _ones(_sizes(w, odd, 300_000)[r]), 0, _sizes(w, odd, 300_000)
    ),
    "reduce_scatter-hot": lambda c, odd, r, w: c.reduce_scatter(_ones(3 * w if odd else 2 * w), 0),
    "reduce_scatter-large": lambda c, odd, r, w: c.reduce_scatter(
        _ones(w * (90_000 if odd else 80_000)), 0
    ),
    "reduce_scatterv-hot": lambda c, odd, r, w: c.reduce_scatterv(
        _ones(sum(_sizes(w, odd))), 0, _sizes(w, odd)
    ),
    "broadcast": lambda c, odd, r, w: c.broadcast(_ones(5 if odd else 4), 0),
    "broadcast-large": lambda c, odd, r, w: c.broadcast(_ones(300_000 if odd else 70_000), 0),
    "gather": lambda c, odd, r, w: c.gather(_ones(5 if odd else 4), 0, 0),
    "operation": lambda c, odd, r, w: c.all_gather(_ones(4), 0) if odd else c.all_reduce(_ones(4)),
}


@pytest.mark.parametrize("variant", sorted(MISMATCHES))
def test_ranks_that_disagree_raise_everywhere_and_stay_in_step(on, variant):
    """Without the consistency mode, a call whose sizes, dtype or operation differ on one rank
    raises CommunicationError on every rank before anything is read (no rank reads past a peer's
    tensor), and the group stays usable: the next calls give the right results everywhere."""
    world, rank = on.world_size, on.rank
    if world == 1:
        pytest.skip("needs a peer to disagree with")
    try:
        MISMATCHES[variant](on, rank == world - 1, rank, world)
        raised = "returned"
    except CommunicationError as exc:
        raised = "passed a different call" in str(exc)
    x = torch.full((3,), float(rank + 1))
    ok = raised is True and on.broken is None
    ok = ok and torch.equal(on.all_reduce(x), torch.full((3,), world * (world + 1) / 2))
    want = torch.cat([torch.full((3,), float(r + 1)) for r in range(world)])
    ok = ok and torch.equal(on.all_gather(x, 0), want)
    big = torch.full((300_000,), float(rank + 1))
    ok = ok and torch.equal(on.all_reduce(big), torch.full((300_000,), world * (world + 1) / 2))
    assert everywhere(ok), f"rank {rank}: raised={raised} broken={on.broken}"


@pytest.mark.parametrize("n", [1, 5, 4099, 300_001])
@pytest.mark.parametrize("dtype", NARROW)
def test_reduce_scatter_into_float32(on, dtype, n):
    """A 16-bit reduce_scatter into float32 results (the hierarchical all_reduce's node step): the
    rank-order float32 sum of this rank's elements, not rounded, through the slots and directly."""
    w, r = on.world_size, on.rank
    xs = [make_input(dtype, q, (n,), salt=n) for q in range(w)]
    counts = [n // w + (q < n % w) for q in range(w)]
    out = torch.empty(counts[r], dtype=torch.float32)
    on.transport.reduce_scatter(xs[r], counts, out.shape, out=out)
    lo = sum(counts[:r])
    want = xs[0][lo : lo + counts[r]].float()
    for x in xs[1:]:
        want = want + x[lo : lo + counts[r]].float()
    assert everywhere(torch.equal(out, want))
    with pytest.raises(TypeError):
        on.transport.reduce_scatter(xs[r], counts, out.shape, out=out.double())
