"""The "mpicomm" torch.distributed backend at any rank count: every operation against the
result torch defines, computed here from every rank's seeded input (tests/jobs/test_distributed_gloo.py
compares the same operations with gloo run on the same inputs)."""

from __future__ import annotations

import functools
import gc
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from mpi4py import MPI

import mpicomm
from mpicomm.distributed.backend import MPIProcessGroup
from tests.helpers import everywhere, same_bits_everywhere

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
OPS = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR")


@pytest.fixture(scope="module", autouse=True)
def default_group():
    torch.set_num_threads(1)
    assert mpicomm.distributed.NAME == "mpicomm"
    dist.init_process_group("mpicomm", init_method="mpi://", timeout=timedelta(seconds=60))
    yield dist.group.WORLD
    dist.destroy_process_group()


def data(rank: int, shape, dtype, low: int = -4, high: int = 5) -> torch.Tensor:
    """Rank ``rank``'s input: the same on every rank that asks."""
    g = torch.Generator().manual_seed(1000 + rank)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(low, high, shape, generator=g).to(dtype)


def expected_reduction(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch's meaning of each reduce op, summing 16-bit floats in float32 in rank order."""
    dtype = tensors[0].dtype
    if name in ("SUM", "AVG"):
        if dtype == torch.bool:
            return functools.reduce(torch.logical_or, tensors)
        acc = torch.zeros(
            tensors[0].shape,
            dtype=torch.float32 if dtype.itemsize < 4 and dtype.is_floating_point else dtype,
        )
        for t in tensors:
            acc = acc + t.to(acc.dtype)
        acc = acc.to(dtype)
        if name == "AVG":
            acc = (
                acc / SIZE
                if dtype.is_floating_point
                else torch.div(acc, SIZE, rounding_mode="trunc")
            )
        return acc
    if dtype == torch.bool:
        fn = {
            "PRODUCT": torch.logical_and,
            "MIN": torch.logical_and,
            "BAND": torch.logical_and,
            "MAX": torch.logical_or,
            "BOR": torch.logical_or,
            "BXOR": torch.logical_xor,
        }[name]
        return functools.reduce(fn, tensors)
    wide = [t.float() if dtype.is_floating_point else t for t in tensors]
    fn = {
        "PRODUCT": torch.mul,
        "MIN": torch.minimum,
        "MAX": torch.maximum,
        "BAND": torch.bitwise_and,
        "BOR": torch.bitwise_or,
        "BXOR": torch.bitwise_xor,
    }[name]
    return functools.reduce(fn, wide).to(dtype)


def close(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if exact or not got.dtype.is_floating_point:
        return torch.equal(got, want)
    tol = 1e-2 if got.dtype.itemsize < 4 else 1e-5
    return torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)


def exact_for(name: str, dtype: torch.dtype) -> bool:
    """Where the result is determined to the bit: integers, min/max, mpicomm's 16-bit sums."""
    if not dtype.is_floating_point or name in ("MIN", "MAX"):
        return True
    return name in ("SUM", "AVG") and dtype.itemsize == 2


def op_cases():
    for name in OPS:
        for dtype in (
            torch.float32,
            torch.bfloat16,
            torch.float16,
            torch.int32,
            torch.uint8,
            torch.bool,
        ):
            if name in ("BAND", "BOR", "BXOR") and dtype.is_floating_point:
                continue
            if name == "AVG" and dtype == torch.bool:
                continue
            yield name, dtype


@pytest.mark.parametrize(("name", "dtype"), list(op_cases()))
def test_all_reduce_every_op(name, dtype):
    low, high = (1, 3) if name == "PRODUCT" else (-4, 5)
    if dtype == torch.uint8:
        low = max(low, 0)
    tensor = data(RANK, (5, 3), dtype, low, high)
    want = expected_reduction(name, [data(r, (5, 3), dtype, low, high) for r in range(SIZE)])
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, name))
    assert everywhere(close(tensor, want, exact_for(name, dtype)))
    assert same_bits_everywhere(tensor)


def test_all_reduce_writes_into_views_and_async_work_behaves_as_torch():
    base = torch.zeros(4, 6)
    view = base[:, ::2]  # non-contiguous: written through a host copy
    view.copy_(data(RANK, (4, 3), torch.float32))
    work = dist.all_reduce(view, async_op=True)
    assert work.wait() is True and work.is_completed()
    value = work.get_future().wait()
    want = expected_reduction("SUM", [data(r, (4, 3), torch.float32) for r in range(SIZE)])
    ok = close(view, want, False) and torch.equal(base[:, 1::2], torch.zeros(4, 3))
    assert everywhere(ok and torch.equal(value[0], view))


def test_unsupported_reduce_ops_raise_naming_them_on_every_rank():
    premul = dist._make_nccl_premul_sum(2.0)
    with pytest.raises(ValueError, match="not supported by the mpicomm backend"):
        dist.all_reduce(torch.ones(2), op=premul)
    with pytest.raises(TypeError, match="BXOR needs an integer or bool tensor"):
        dist.all_reduce(torch.ones(2), op=dist.ReduceOp.BXOR)
    x = torch.ones(3)
    dist.all_reduce(x)  # the group still works
    assert everywhere(torch.equal(x, torch.full((3,), float(SIZE))))


@pytest.mark.parametrize("name", ["SUM", "MAX", "PRODUCT"])
def test_reduce_reaches_the_root_only(name):
    for root in range(SIZE):
        x = data(RANK, (7,), torch.int64, 1, 4)
        mine = x.clone()
        dist.reduce(x, dst=root, op=getattr(dist.ReduceOp, name))
        want = expected_reduction(name, [data(r, (7,), torch.int64, 1, 4) for r in range(SIZE)])
        assert everywhere(torch.equal(x, want) if root == RANK else torch.equal(x, mine))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.bool])
def test_broadcast_from_every_rank(dtype):
    for src in range(SIZE):
        x = data(RANK, (3, 4), dtype)
        dist.broadcast(x, src=src)
        assert everywhere(torch.equal(x, data(src, (3, 4), dtype)))


def test_all_gather_list_equal_and_unequal_sizes():
    outs = [torch.empty(2, 3) for _ in range(SIZE)]
    dist.all_gather(outs, data(RANK, (2, 3), torch.float32))
    ok = all(torch.equal(o, data(r, (2, 3), torch.float32)) for r, o in enumerate(outs))
    outs = [torch.empty(r + 1, dtype=torch.int32) for r in range(SIZE)]
    dist.all_gather(outs, data(RANK, (RANK + 1,), torch.int32))
    ok &= all(torch.equal(o, data(r, (r + 1,), torch.int32)) for r, o in enumerate(outs))
    assert everywhere(ok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_all_gather_into_tensor(dtype):
    out = torch.empty(SIZE * 2, 3, dtype=dtype)
    dist.all_gather_into_tensor(out, data(RANK, (2, 3), dtype))
    want = torch.cat([data(r, (2, 3), dtype) for r in range(SIZE)])
    stacked = torch.empty(SIZE, 2, 3, dtype=dtype)
    dist.all_gather_into_tensor(stacked, data(RANK, (2, 3), dtype))
    assert everywhere(torch.equal(out, want) and torch.equal(stacked.reshape(-1, 3), want))


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("SUM", torch.float32), ("SUM", torch.bfloat16), ("MAX", torch.int32), ("AVG", torch.float64)],
)
def test_reduce_scatter_list_and_tensor(name, dtype):
    op = getattr(dist.ReduceOp, name)
    inputs = [data(RANK * SIZE + d, (4,), dtype) for d in range(SIZE)]
    out = torch.empty(4, dtype=dtype)
    dist.reduce_scatter(out, inputs, op=op)
    want = expected_reduction(name, [data(r * SIZE + RANK, (4,), dtype) for r in range(SIZE)])
    ok = close(out, want, exact_for(name, dtype))
    single = torch.empty(4, dtype=dtype)
    dist.reduce_scatter_tensor(single, torch.cat(inputs), op=op)
    ok &= close(single, want, exact_for(name, dtype))
    assert everywhere(ok)


@pytest.mark.parametrize("rows", [2, 40_000])
def test_outputs_of_one_memory_views_and_in_place_forms(rows):
    """Outputs the communicator writes straight into (one contiguous tensor, the chunks of one
    buffer), the in-place forms (the input is this rank's chunk of the output), and outputs that
    are not one memory (transposed, strided: through a copy), at a hot-path size and past it: the
    results torch defines, the inputs unchanged, nothing outside the outputs written."""
    x = data(RANK, (rows, 3), torch.float32)
    before = x.clone()
    want = torch.cat([data(r, (rows, 3), torch.float32) for r in range(SIZE)])
    buf = torch.empty(SIZE * rows, 3)
    dist.all_gather(list(buf.chunk(SIZE)), x)
    ok = torch.equal(buf, want)
    counts = [r + 1 for r in range(SIZE)]  # unequal: all_gatherv into one buffer
    buf = torch.zeros(sum(counts) + 1)
    dist.all_gather(list(buf[:-1].split(counts)), data(RANK, (RANK + 1,), torch.float32))
    uneven = torch.cat([data(r, (r + 1,), torch.float32) for r in range(SIZE)])
    ok &= torch.equal(buf[:-1], uneven) and buf[-1] == 0
    buf = torch.zeros(SIZE * rows, 3)
    buf.chunk(SIZE)[RANK].copy_(x)
    dist.all_gather_into_tensor(buf, buf.chunk(SIZE)[RANK])
    ok &= torch.equal(buf, want)
    transposed = torch.empty(3, SIZE * rows).t()
    dist.all_gather_into_tensor(transposed, x)
    ok &= torch.equal(transposed, want)
    for root in range(SIZE):
        buf = torch.zeros(SIZE * rows + 1, 3)
        outs = list(buf[:-1].chunk(SIZE)) if root == RANK else None
        dist.gather(x, outs, dst=root)
        if root == RANK:
            ok &= torch.equal(buf[:-1], want) and not buf[-1].any()
    big = data(RANK, (SIZE * rows, 3), torch.float32)
    big_before = big.clone()
    total = expected_reduction(
        "SUM", [data(r, (SIZE * rows, 3), torch.float32) for r in range(SIZE)]
    )
    mine = total.chunk(SIZE)[RANK]
    out = torch.empty(rows, 3)
    dist.reduce_scatter_tensor(out, big)
    ok &= close(out, mine, False)
    wide = torch.zeros(rows, 6)
    dist.reduce_scatter_tensor(wide[:, ::2], big, op=dist.ReduceOp.AVG)
    ok &= close(wide[:, ::2], mine / SIZE, False) and not wide[:, 1::2].any()
    assert everywhere(ok and torch.equal(x, before) and torch.equal(big, big_before))


def test_gather_and_scatter_from_every_root():
    ok = True
    for root in range(SIZE):
        outs = [torch.empty(3) for _ in range(SIZE)] if root == RANK else None
        dist.gather(data(RANK, (3,), torch.float32), outs, dst=root)
        if root == RANK:
            ok &= all(torch.equal(o, data(r, (3,), torch.float32)) for r, o in enumerate(outs))
        pieces = [data(root * SIZE + d, (2, 2), torch.int16) for d in range(SIZE)]
        got = torch.empty(2, 2, dtype=torch.int16)
        dist.scatter(got, pieces if root == RANK else None, src=root)
        ok &= torch.equal(got, data(root * SIZE + RANK, (2, 2), torch.int16))
    assert everywhere(ok)


def test_all_to_all_lists_of_any_sizes():
    # rank s sends (s + d + 1) elements to rank d
    inputs = [data(RANK * SIZE + d, (RANK + d + 1,), torch.float32) for d in range(SIZE)]
    outputs = [torch.empty(s + RANK + 1) for s in range(SIZE)]
    dist.all_to_all(outputs, inputs)
    ok = all(
        torch.equal(o, data(s * SIZE + RANK, (s + RANK + 1,), torch.float32))
        for s, o in enumerate(outputs)
    )
    assert everywhere(ok)


def test_all_to_all_single_even_and_with_splits():
    x = data(RANK, (SIZE * 2, 3), torch.float32)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    want = torch.cat(
        [data(s, (SIZE * 2, 3), torch.float32)[RANK * 2 : RANK * 2 + 2] for s in range(SIZE)]
    )
    ok = torch.equal(out, want)

    def rows(s, d):  # rows rank s sends to rank d
        return (s + 2 * d) % 3

    send = [rows(RANK, d) for d in range(SIZE)]
    recv = [rows(s, RANK) for s in range(SIZE)]
    x = data(RANK, (sum(send), 2), torch.int32)
    out = torch.empty(sum(recv), 2, dtype=torch.int32)
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send)
    parts = []
    for s in range(SIZE):
        theirs = [rows(s, d) for d in range(SIZE)]
        start = sum(theirs[:RANK])
        parts.append(data(s, (sum(theirs), 2), torch.int32)[start : start + theirs[RANK]])
    ok &= torch.equal(out, torch.cat(parts))
    assert everywhere(ok)


def test_barrier_and_monitored_barrier():
    dist.barrier()
    dist.monitored_barrier(timeout=timedelta(seconds=30), wait_all_ranks=True)
    work = dist.barrier(async_op=True)
    assert everywhere(work.wait())


def test_isend_irecv_ring_of_large_messages_does_not_deadlock():
    """Messages beyond the eager limit: blocking sends in a ring would deadlock."""
    nxt, prev = (RANK + 1) % SIZE, (RANK - 1) % SIZE
    send = data(RANK, (1 << 18,), torch.float32)  # 1 MiB
    got = torch.empty(1 << 18)
    ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, got, prev)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    back = torch.empty(1 << 18)
    ops = [dist.P2POp(dist.irecv, back, nxt), dist.P2POp(dist.isend, send, prev)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    assert everywhere(
        torch.equal(got, data(prev, (1 << 18,), torch.float32))
        and torch.equal(back, data(nxt, (1 << 18,), torch.float32))
    )


def test_send_recv_blocking_into_a_view_and_from_any_source():
    if SIZE < 2:
        pytest.skip("needs two ranks")
    ok = True
    if RANK == 0:
        dist.send(data(0, (5,), torch.bfloat16), dst=1, tag=3)
        for _ in range(SIZE - 1):
            box = torch.empty(2)
            sender = dist.recv(box, tag=4)  # any source
            ok &= torch.equal(box, torch.full((2,), float(sender)))
    else:
        if RANK == 1:
            base = torch.zeros(5, 2, dtype=torch.bfloat16)
            dist.recv(base[:, 1], src=0, tag=3)
            ok &= torch.equal(base[:, 1], data(0, (5,), torch.bfloat16))
        dist.send(torch.full((2,), float(RANK)), dst=0, tag=4)
    assert everywhere(ok)


def test_receive_wait_is_bounded():
    if SIZE < 2:
        pytest.skip("needs two ranks")
    if RANK == 0:
        work = dist.irecv(torch.empty(1), src=1, tag=999)  # nobody sends with tag 999
        with pytest.raises(mpicomm.CollectiveTimeoutError, match="did not complete within"):
            work.wait(timeout=timedelta(seconds=0.3))
    dist.barrier()


def test_object_collectives_round_trip():
    objs = [None] * SIZE
    dist.all_gather_object(objs, {"rank": RANK, "text": "x" * RANK})
    ok = objs == [{"rank": r, "text": "x" * r} for r in range(SIZE)]
    items = [("from", RANK, [1, 2])] if RANK == SIZE - 1 else [None]
    dist.broadcast_object_list(items, src=SIZE - 1)
    ok &= items == [("from", SIZE - 1, [1, 2])]
    gathered = [None] * SIZE if RANK == 0 else None
    dist.gather_object({RANK}, gathered, dst=0)
    ok &= RANK != 0 or gathered == [{r} for r in range(SIZE)]
    out = [None]
    dist.scatter_object_list(out, [f"to {d}" for d in range(SIZE)] if RANK == 0 else None, src=0)
    ok &= out == [f"to {RANK}"]
    assert everywhere(ok)


def test_new_group_is_an_mpi_sub_communicator():
    evens = list(range(0, SIZE, 2))
    group = dist.new_group(evens)
    member = RANK in evens
    ok = isinstance(group, MPIProcessGroup) == member
    if member:
        x = torch.full((3,), float(RANK))
        dist.all_reduce(x, group=group)
        ok &= torch.equal(x, torch.full((3,), float(sum(evens))))
        ok &= dist.get_rank(group) == evens.index(RANK) and dist.get_world_size(group) == len(evens)
        ok &= MPI.Comm.Compare(group.comm, WORLD) in (
            (MPI.CONGRUENT,) if len(evens) == SIZE else (MPI.UNEQUAL,)
        )
        objs = [None] * len(evens)
        dist.all_gather_object(objs, RANK, group=group)
        ok &= objs == evens
        b = torch.full((2,), float(RANK))
        dist.broadcast(b, group_src=len(evens) - 1, group=group)
        ok &= torch.equal(b, torch.full((2,), float(evens[-1])))
    assert everywhere(ok)
    if member:
        dist.destroy_process_group(group)


def test_new_group_asked_for_gloo_is_served_by_mpicomm():
    """torch hands new_group to the default group's new_group: no gloo group is made."""
    group = dist.new_group(list(range(SIZE)), backend="gloo")
    x = torch.ones(2)
    dist.all_reduce(x, group=group)
    assert everywhere(
        isinstance(group, MPIProcessGroup) and torch.equal(x, torch.full((2,), float(SIZE)))
    )


def test_ddp_matches_single_process_training_on_the_union_of_batches():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    if RANK != 0:  # DDP must broadcast rank 0's parameters to the others
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0001)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    def batch(step, rank):
        g = torch.Generator().manual_seed(step * 100 + rank)
        return torch.randn(4, 6, generator=g), torch.randn(4, 2, generator=g)

    for step in range(3):
        x, y = batch(step, RANK)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        xs, ys = zip(*(batch(step, r) for r in range(SIZE)), strict=True)
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(reference(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()
    ok = all(
        torch.allclose(p, q, atol=1e-6)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert everywhere(ok)
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert same_bits_everywhere(params)


# ----------------------------------------------------------------- refusals (as gloo refuses)
def test_all_gather_output_list_of_the_wrong_length_is_refused_on_every_rank():
    for length in (SIZE + 1, SIZE - 1):
        if length < 1:
            continue
        outs = [torch.empty(3) for _ in range(length)]
        with pytest.raises(ValueError, match=f"tensor_list has {length} tensors"):
            dist.all_gather(outs, torch.ones(3))
    outs = [torch.empty(4) for _ in range(SIZE)]  # every entry, this rank's too, of another size
    with pytest.raises(ValueError, match="tensor_list.*has 4 elements, the input has 3"):
        dist.all_gather(outs, torch.ones(3))
    outs = [torch.empty(3) for _ in range(SIZE)]
    dist.all_gather(outs, torch.full((3,), float(RANK)))  # the group still works
    assert everywhere(all(torch.equal(o, torch.full((3,), float(r))) for r, o in enumerate(outs)))


def test_all_gather_lists_that_differ_between_ranks_raise_on_every_rank():
    if SIZE < 2:
        pytest.skip("needs two ranks")
    sizes = [r + 1 for r in range(SIZE)]  # rank r gathers r + 1 elements
    if RANK == 0:
        sizes[-1] += 1000  # rank 0 expects more from the last rank than it sends
    outs = [torch.empty(n) for n in sizes]
    with pytest.raises(ValueError, match="tensor_list sizes differ"):
        dist.all_gather(outs, torch.ones(RANK + 1))


def test_other_lists_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match=f"input_list has {SIZE + 1} tensors"):
        dist.reduce_scatter(torch.empty(2), [torch.ones(2)] * (SIZE + 1))
    with pytest.raises(ValueError, match=f"input_tensor_list has {SIZE + 1} tensors"):
        dist.all_to_all([torch.empty(1)] * SIZE, [torch.ones(1)] * (SIZE + 1))
    with pytest.raises(ValueError, match="all_gather_into_tensor: output has"):
        dist.all_gather_into_tensor(torch.empty(SIZE * 3 + 1), torch.ones(3))
    with pytest.raises(ValueError, match="reduce_scatter_tensor: input has"):
        dist.reduce_scatter_tensor(torch.empty(2), torch.ones(SIZE * 2 + 1))
    with pytest.raises(ValueError, match="all_to_all_single: output rows"):
        dist.all_to_all_single(torch.empty(SIZE, 3), torch.ones(SIZE, 2))


# ----------------------------------------------------------------- MPICOMM_VALIDATE=1
def _mismatched_calls():
    """Calls whose arguments differ between ranks (rank 0 against the others) in a way no rank
    can see alone: each must raise the consistency mode's ValueError on every rank."""
    n = 2 if RANK == 0 else 3
    yield (
        "all_gather_into_tensor",
        lambda g: dist.all_gather_into_tensor(torch.empty(SIZE * n), torch.ones(n), group=g),
    )
    yield (
        "all_gather",
        lambda g: dist.all_gather([torch.empty(n) for _ in range(SIZE)], torch.ones(n), group=g),
    )
    yield (
        "reduce_scatter_tensor",
        lambda g: dist.reduce_scatter_tensor(torch.empty(n), torch.ones(SIZE * n), group=g),
    )
    yield (
        "reduce_scatter",
        lambda g: dist.reduce_scatter(torch.empty(n), [torch.ones(n)] * SIZE, group=g),
    )
    yield "all_reduce", lambda g: dist.all_reduce(torch.ones(n), group=g)
    yield "all_reduce MAX", lambda g: dist.all_reduce(torch.ones(n), op=dist.ReduceOp.MAX, group=g)
    yield "broadcast", lambda g: dist.broadcast(torch.ones(n), group_src=0, group=g)
    yield (
        "gather",
        lambda g: dist.gather(
            torch.ones(n), [torch.empty(n) for _ in range(SIZE)] if RANK == 0 else None, group=g
        ),
    )
    yield (
        "scatter",
        lambda g: dist.scatter(
            torch.empty(n), [torch.ones(n)] * SIZE if RANK == 0 else None, group=g
        ),
    )
    yield (
        "all_to_all_single",
        lambda g: dist.all_to_all_single(torch.empty(SIZE, n), torch.ones(SIZE, n), group=g),
    )
    # the per-peer sizes: rank 0 expects two rows (elements) from the last rank, which sends one
    expect = [1] * (SIZE - 1) + [1 + (RANK == 0)]
    yield (
        "all_to_all_single splits",
        lambda g: dist.all_to_all_single(
            torch.empty(sum(expect), 2),
            torch.ones(SIZE, 2),
            output_split_sizes=expect,
            input_split_sizes=[1] * SIZE,
            group=g,
        ),
    )
    yield (
        "all_to_all sizes",
        lambda g: dist.all_to_all(
            [torch.empty(e) for e in expect], [torch.ones(1)] * SIZE, group=g
        ),
    )
    yield (
        "barrier against all_reduce",
        lambda g: dist.barrier(group=g) if RANK == 0 else dist.all_reduce(torch.ones(1), group=g),
    )


@pytest.mark.parametrize("case", [name for name, _ in _mismatched_calls()])
def test_validate_mode_catches_mismatched_calls_on_every_rank(case, monkeypatch):
    if SIZE < 2:
        pytest.skip("needs two ranks")
    monkeypatch.setenv("MPICOMM_VALIDATE", "1")
    group = dist.new_group(list(range(SIZE)), timeout=timedelta(seconds=30))
    call = dict(_mismatched_calls())[case]
    with pytest.raises(ValueError, match="the ranks disagree on"):
        call(group)
    x = torch.ones(2)
    dist.all_reduce(x, group=group)  # the ranks are still in step
    assert everywhere(torch.equal(x, torch.full((2,), float(SIZE))))
    dist.destroy_process_group(group)


# ----------------------------------------------------------------- point-to-point buffers
def test_a_dropped_isend_of_a_view_still_sends_the_view():
    """The work of a non-contiguous isend is dropped at once: the host copy MPI sends from must
    stay alive until the send completes (the group holds it), whatever reuses freed memory."""
    if SIZE < 2:
        pytest.skip("needs two ranks")
    n = 1 << 18  # 1 MiB of float32: beyond the eager limit, read when the receiver is ready
    want = torch.arange(2 * n, dtype=torch.float32)[::2].clone()
    ok = True
    if RANK == 0:
        base = torch.arange(2 * n, dtype=torch.float32)
        dist.isend(base[::2], dst=1)  # work dropped, never waited on
        gc.collect()
        junk = [torch.full((n,), -1.0) for _ in range(8)]  # reuse what was freed
        WORLD.Barrier()
        WORLD.Barrier()  # progresses the send while rank 1 receives
        del junk
    elif RANK == 1:
        WORLD.Barrier()
        got = torch.empty(n)
        dist.irecv(got, src=0).wait()
        ok = torch.equal(got, want)
        WORLD.Barrier()
    else:
        WORLD.Barrier()
        WORLD.Barrier()
    assert everywhere(ok)


# ----------------------------------------------------------------- resources
def _free_context_ids() -> int:
    """How many more communicators MPI could make now (each holds one context id)."""
    made = []
    try:
        while True:
            made.append(MPI.COMM_SELF.Dup())
    except MPI.Exception:
        pass
    for c in made:
        c.Free()
    return len(made)


def _mapped_segments() -> int:
    with open("/proc/self/maps") as f:
        return sum("/mpicomm-" in line for line in f)


def test_a_group_holds_one_segment_and_at_most_three_communicators():
    """Counted as MPI's context ids (one per communicator), hidden ones included: mpi4py keeps a
    duplicate of a communicator the first time a pickled reduction (``comm.allreduce(obj, op)``)
    runs on it, so the group's construction must not run one."""
    before, segments = _free_context_ids(), _mapped_segments()
    group = dist.new_group(list(range(SIZE)), timeout=timedelta(seconds=30))
    x = torch.ones(8)
    dist.all_reduce(x, group=group)
    dist.broadcast(x, group_src=0, group=group)
    dist.barrier(group=group)
    held = before - _free_context_ids()
    mapped = _mapped_segments() - segments
    shm = group.communicator.transport is not None
    dist.destroy_process_group(group)
    after = _free_context_ids()
    assert everywhere(held <= 3), (held, shm)
    assert everywhere(mapped == int(shm) and mapped <= 1), (mapped, shm)
    assert everywhere(after == before and _mapped_segments() == segments)
