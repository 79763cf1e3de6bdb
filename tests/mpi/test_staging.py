"""The host staging path, on CPU tensors (no GPU needed).

``staging=True`` sends CPU tensors through exactly the code that stages CUDA tensors when the MPI
library is not CUDA-aware (pinned host workspace in, MPI on host memory, copy out), so these tests
cover that path in CI. Written for any number of ranks:

    python -m pytest tests/mpi/test_staging.py
    timeout 600 mpiexec -n 3 python -m pytest --with-mpi -q tests/mpi/test_staging.py

scripts/test.sh runs it, with the rest of tests/mpi, at 1, 2, 3 and 4 ranks (3 gives uneven
chunks in the bytes sum).
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from mpicomm import MPICommunicator, buffers
from mpicomm.check import make_input, reference_sum
from tests import conformance

torch.set_num_threads(1)
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def staged():
    comm = MPICommunicator(MPI.COMM_WORLD, staging=True, timeout=TIMEOUT, unique_name="staged")
    yield comm
    comm.destroy()


@pytest.fixture(scope="module")
def plain():
    # The MPI path, as the staged one: float sums in MPI's own order must match bit for bit
    # (the shared-memory path sums in rank order; tests/mpi/test_shm.py compares it).
    comm = MPICommunicator(
        MPI.COMM_WORLD, staging=False, timeout=TIMEOUT, unique_name="plain", shm="0"
    )
    yield comm
    comm.destroy()


def fresh(**options) -> MPICommunicator:
    """A communicator with an empty workspace (collective)."""
    return MPICommunicator(MPI.COMM_WORLD, staging=True, timeout=TIMEOUT, **options)


@pytest.mark.parametrize("dtype", conformance.DTYPE_LIST, ids=conformance.DTYPE_IDS)
@pytest.mark.parametrize("name", conformance.COLLECTIVES)
def test_staged_equals_unstaged_and_reference(staged, plain, name, dtype):
    """Every collective and dtype: staged results match the reference and, bit for bit, the
    results of the unstaged path on the same inputs."""
    differ = conformance.differences(staged, plain, name, dtype, "cpu", salt=7)
    assert not differ, f"staged and unstaged results differ: {differ}"


@pytest.mark.parametrize("algo", ["native", "bytes"])
def test_both_reduction_algorithms_staged(algo):
    """float32 sums through the staging path by MPI's Allreduce and by the bytes algorithm."""
    comm = fresh(allreduce_algo=algo)
    try:
        for name in ("all_reduce", "reduce_scatter", "reduce_scatterv", "dispatch_combine"):
            outcomes, problems = conformance.run(comm, name, torch.float32, "cpu", salt=3)
            conformance.check_against_reference(outcomes, problems)
        assert ("parts", "cpu") in comm.workspace.held or algo == "native"
    finally:
        comm.destroy()


@pytest.mark.parametrize("algo", ["native", "bytes"])
def test_device_memory_handoff(plain, monkeypatch, algo):
    """The direct path (CUDA-aware MPI) hands tensors to mpi4py by DLPack, not as numpy views.
    Host tensors handed over that way cover the branch on CPU: carrier-dtype views, counts,
    v-collective displacements, the in-place all-gather of a slice, byte specs for send/recv.
    Results must equal the reference and, bit for bit, the numpy path's."""
    monkeypatch.setattr(buffers, "_memory", buffers._device_memory)
    comm = MPICommunicator(MPI.COMM_WORLD, timeout=TIMEOUT, allreduce_algo=algo, shm="0")
    try:
        for name in conformance.COLLECTIVES:
            for dtype in conformance.DTYPE_LIST:
                exact = algo == "native"
                differ = conformance.differences(comm, plain, name, dtype, "cpu", 5, exact)
                assert not differ, f"{name} {dtype}: DLPack and numpy results differ: {differ}"
    finally:
        comm.destroy()


def test_staging_uses_the_workspace(staged, plain):
    """The staged communicator really stages (its workspace fills); the plain one does not."""
    x = torch.arange(12, dtype=torch.float32)
    before = plain.workspace.allocations
    staged.all_reduce(x)
    plain.all_reduce(x)
    assert {"in", "out"} <= {slot for slot, _ in staged.workspace.held}
    assert plain.workspace.allocations == before


def test_staging_switched_on_by_environment(monkeypatch):
    monkeypatch.setenv("MPICOMM_STAGING", "1")
    comm = MPICommunicator(MPI.COMM_WORLD)
    try:
        assert comm.staging
        comm.all_reduce(torch.ones(4))
        assert comm.workspace.allocations > 0
    finally:
        comm.destroy()


def _calls(comm: MPICommunicator, rows: int, dtype: torch.dtype) -> list:
    """One call of each collective with ``rows`` x 8 inputs (rows divisible by the world size)."""
    world, rank = comm.world_size, comm.rank
    x = make_input(dtype, rank, (rows, 8), rows)
    calls = [
        lambda: comm.all_reduce(x),
        lambda: comm.all_gather(x, 0),
        lambda: comm.all_gather(x, -1),
        lambda: comm.reduce_scatter(x, 0),
        lambda: comm.reduce_scatterv(x, 0, [rows // world] * world),
        lambda: comm.all_gatherv([x, x[:, :3]], 0, [rows] * world),
        lambda: comm.gather(x, 0, 0),
        lambda: comm.broadcast(x, world - 1),
    ]
    if world > 1:

        def ring():
            if rank % 2 == 0:
                comm.send(x, (rank + 1) % world)
            got = comm.recv((rows, 8), dtype, (rank - 1) % world)
            if rank % 2 == 1:
                comm.send(x, (rank + 1) % world)
            assert got.shape == (rows, 8)

        calls.append(ring)
    return calls


def _each_growth(comm: MPICommunicator, rows: int, dtype: torch.dtype) -> list[int]:
    """The number of workspace allocations made by each call of :func:`_calls`."""
    ws, grown = comm.workspace, []
    for call in _calls(comm, rows, dtype):
        before = ws.allocations
        call()
        grown.append(ws.allocations - before)
    return grown


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_no_allocation_after_first_call_of_a_size(dtype):
    """Workspace.allocations stays flat across repeated calls of one size; a larger call grows
    each slot it uses at most once; smaller calls afterwards allocate nothing. (Every rank makes
    every call before anything is asserted, so a failure cannot leave a rank waiting.)"""
    comm = fresh()
    ws = comm.workspace
    rows = 12 * comm.world_size
    problems = []
    try:
        first = _each_growth(comm, rows, dtype)
        repeats = [_each_growth(comm, rows, dtype) for _ in range(3)]
        larger = _each_growth(comm, 8 * rows, dtype)
        later = {size: _each_growth(comm, size, dtype) for size in (8 * rows, rows, 4 * rows)}
        if sum(first) == 0:
            problems.append("the first calls allocated nothing: not staged?")
        if any(sum(r) for r in repeats):
            problems.append(f"repeated calls of one size allocated staging memory: {repeats}")
        if sum(larger) == 0 or max(larger) > len(ws.held):
            problems.append(f"a larger size should grow each slot at most once: {larger}")
        if any(sum(g) for g in later.values()):
            problems.append(f"calls no larger than before allocated staging memory: {later}")
    finally:
        comm.destroy()
    assert not problems, problems


def _model(world: int) -> torch.nn.Module:
    """Parameters of several dtypes; the largest, (24 * world, 64) bfloat16, divides evenly."""
    model = torch.nn.Module()
    model.embed = torch.nn.Parameter(torch.zeros(24 * world, 64, dtype=torch.bfloat16))
    model.proj = torch.nn.Linear(32, 40)
    model.register_buffer("steps", torch.zeros(7, dtype=torch.int64))
    return model


@pytest.mark.parametrize("algo", ["auto", "bytes"])
def test_prepare_reserves_the_first_call(algo):
    """After prepare_communication_buffer_for_model, the first all_reduce / reduce_scatter /
    all_gather of (up to) the largest parameter's size allocates no staging memory."""
    comm = fresh(allreduce_algo=algo)
    world, rank = comm.world_size, comm.rank
    try:
        model = _model(world)
        comm.prepare_communication_buffer_for_model(model)
        reserved = comm.workspace.allocations
        assert reserved > 0
        assert comm.workspace.nbytes >= 2 * model.embed.numel() * 2
        big = make_input(torch.bfloat16, rank, tuple(model.embed.shape), 1)
        proj = make_input(torch.float32, rank, tuple(model.proj.weight.shape), 1)
        comm.all_reduce(big)
        comm.all_reduce(proj)
        comm.reduce_scatter(big, 0)
        comm.reduce_scatter(proj, 0) if proj.shape[0] % world == 0 else None
        comm.all_gather(big[: big.shape[0] // world], 0)
        comm.all_gather(big[:, : 64 // world if 64 % world == 0 else 16], -1)
        assert comm.workspace.allocations == reserved, "the first call allocated staging memory"
    finally:
        comm.destroy()


def test_prepare_does_nothing_without_staging(plain):
    model = _model(plain.world_size)
    before = plain.workspace.allocations
    plain.prepare_communication_buffer_for_model(model)
    assert plain.workspace.allocations == before
    plain.prepare_communication_buffer_for_model(torch.nn.Module())  # no parameters at all


def _overlaps_workspace(result: torch.Tensor, comm: MPICommunicator) -> bool:
    return any(
        conformance.same_storage(result, held)
        for held in comm.workspace.held.values()
        if held.device == result.device
    )


def _alias_calls(comm: MPICommunicator, xs: list[torch.Tensor]) -> dict:
    """name -> (call, expected result) for this rank's input ``xs[rank]``."""
    world, rank, x = comm.world_size, comm.rank, xs[comm.rank]
    return {
        "all_reduce": (lambda: comm.all_reduce(x), reference_sum(xs)),
        "all_gather": (lambda: comm.all_gather(x, 0), torch.cat(xs)),
        "all_gather_last": (lambda: comm.all_gather(x, -1), torch.cat(xs, -1)),
        "reduce_scatter": (lambda: comm.reduce_scatter(x, 0), reference_sum(xs).chunk(world)[rank]),
        "reduce_scatter_last": (
            lambda: comm.reduce_scatter(x, -1),
            reference_sum(xs).chunk(world, -1)[rank],
        ),
        "broadcast": (lambda: comm.broadcast(x, 0), xs[0]),
        "all_gatherv": (lambda: comm.all_gatherv(x, 0), torch.cat(xs)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
def test_results_never_alias_the_workspace(staged, dtype):
    """Mutating a result changes neither the next call's result nor the inputs; no result lives
    in staging memory."""
    world, rank = staged.world_size, staged.rank
    xs = [make_input(dtype, i, (4 * world, 2 * world), 5) for i in range(world)]
    x, kept = xs[rank], xs[rank].clone()
    problems = []  # every rank makes every call; assert at the end
    for name, (call, expected) in _alias_calls(staged, xs).items():
        first = call()
        if _overlaps_workspace(first, staged):
            problems.append(f"{name}: result is staging memory")
        if conformance.same_storage(first, x):
            problems.append(f"{name}: result aliases the input")
        outcome = conformance.Outcome(name, first.clone(), expected.contiguous(), summed=True)
        if not conformance.matches(outcome):
            problems.append(f"{name}: wrong result")
        first.fill_(13)
        second = call()
        if not conformance.equal_bits(second, outcome.result):
            problems.append(f"{name}: changed by mutating the previous result")
        if not conformance.equal_bits(x, kept):
            problems.append(f"{name}: the input changed")
        second.zero_()
        if not conformance.equal_bits(call(), outcome.result):
            problems.append(f"{name}: changed by mutating the previous result")
    assert not problems, problems


def test_rejects_tensors_on_other_devices(staged):
    """Only CPU and CUDA tensors move; the error comes before any MPI call (on every rank)."""
    meta = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="only CPU and CUDA"):
        staged.all_reduce(meta)
    with pytest.raises(ValueError, match="only CPU and CUDA"):
        staged.broadcast(meta)
    # The communicator is still usable afterwards.
    assert conformance.equal_bits(
        staged.all_reduce(torch.ones(3)), torch.full((3,), float(staged.world_size))
    )
