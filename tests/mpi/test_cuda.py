"""Every collective on CUDA tensors: the same conformance checks as on CPU tensors, plus what only a
GPU shows (pinned staging memory, stream synchronisation, CPU and CUDA inputs mixed on one
communicator, a tensor on another GPU refused). Skipped, with a reason, where torch sees no GPU.

Run on a GPU machine with several ranks sharing one GPU (tests/gpu/run_on_gpu.sh does this):

    timeout 900 mpiexec -n 2 python -m pytest --with-mpi -q tests/mpi/test_cuda.py
    timeout 900 mpiexec -n 4 python -m pytest --with-mpi -q tests/mpi/test_cuda.py

``MPICOMM_TEST_CUDA_ON_CPU=1`` runs the device-independent part of this file on CPU tensors through
the staging path, to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from mpi4py import MPI

from mpicomm import MPICommunicator
from mpicomm.check import make_input, reference_sum
from mpicomm.reduction import sum_in_rank_order
from mpicomm.topology import default_device, node_topology
from tests import conformance

HAVE_CUDA = torch.cuda.is_available()
ON_CPU = not HAVE_CUDA and os.environ.get("MPICOMM_TEST_CUDA_ON_CPU") == "1"
TIMEOUT = 120.0

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not HAVE_CUDA and not ON_CPU, reason="torch sees no CUDA device (torch.cuda.is_available())"
    ),
]
needs_gpu = pytest.mark.skipif(not HAVE_CUDA, reason="needs a real CUDA device")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def device() -> torch.device:
    """This rank's GPU: local rank modulo the GPUs torch sees (several ranks may share one)."""
    if not HAVE_CUDA:
        return torch.device("cpu")
    dev = default_device(node_topology(MPI.COMM_WORLD).local_rank)
    torch.cuda.set_device(dev)
    return dev


def make_comm(device: torch.device, **options) -> MPICommunicator:
    """A communicator for ``device`` (collective). In CPU self-test mode: forced staging."""
    if ON_CPU:
        options.setdefault("staging", True)
    return MPICommunicator(MPI.COMM_WORLD, device=device, timeout=TIMEOUT, **options)


@pytest.fixture(scope="module")
def comm(device):
    c = make_comm(device, unique_name="cuda")
    yield c
    c.destroy()


@pytest.fixture(scope="module")
def cpu_comm():
    c = MPICommunicator(MPI.COMM_WORLD, timeout=TIMEOUT, unique_name="cpu")
    yield c
    c.destroy()


def staged(comm: MPICommunicator, device: torch.device) -> bool:
    return comm.staged(device)


@pytest.mark.parametrize("dtype", conformance.DTYPE_LIST, ids=conformance.DTYPE_IDS)
@pytest.mark.parametrize("name", conformance.COLLECTIVES)
def test_conformance_on_device(comm, cpu_comm, device, name, dtype):
    """Every collective and dtype on device tensors: results on the input's device, equal to the
    reference, inputs unchanged; and equal to the same collective on CPU tensors (bit for bit,
    except float32/64 sums on the direct path, which MPI may order differently)."""
    exact = staged(comm, device)
    differ = conformance.differences(comm, cpu_comm, name, dtype, device, 11, exact)
    assert not differ, f"device and CPU results differ: {differ}"


def test_path_matches_the_library(comm, device):
    """CUDA tensors are staged exactly when MPI is not CUDA-aware (or staging is forced)."""
    assert staged(comm, device) == (comm.staging or not comm.cuda_aware)
    x = torch.ones(16, device=device)
    before = comm.workspace.allocations
    comm.all_reduce(x)
    if staged(comm, device):
        assert ("in", "cpu") in comm.workspace.held and ("out", "cpu") in comm.workspace.held
    else:
        assert comm.workspace.allocations == before


@needs_gpu
def test_staging_memory_is_pinned(comm, device):
    if not staged(comm, device):
        pytest.skip("MPI is CUDA-aware here: nothing is staged")
    comm.all_reduce(torch.ones(1000, dtype=torch.bfloat16, device=device))
    slots = comm.workspace.held
    assert slots[("in", "cpu")].is_pinned() and slots[("out", "cpu")].is_pinned()


def _device_calls(comm: MPICommunicator, x: torch.Tensor) -> list:
    world = comm.world_size
    return [
        lambda: comm.all_reduce(x),
        lambda: comm.all_gather(x, 0),
        lambda: comm.all_gather(x, -1),
        lambda: comm.reduce_scatter(x, 0),
        lambda: comm.reduce_scatterv(x, 0, [x.shape[0] // world] * world),
        lambda: comm.all_gatherv(x, 0),
        lambda: comm.broadcast(x, world - 1),
        lambda: comm.gather(x, 0, 0),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_allocation_after_first_call_of_a_size(device, dtype):
    """Staging/scratch memory and the GPU memory in use stay flat across repeated calls."""
    c = make_comm(device)
    try:
        x = make_input(dtype, c.rank, (16 * c.world_size, 32), 2).to(device)
        calls = _device_calls(c, x)
        for call in calls:
            call()
        first = c.workspace.allocations
        in_use = torch.cuda.memory_allocated(device) if HAVE_CUDA else 0
        for _ in range(5):
            for call in calls:
                call()
        repeated = c.workspace.allocations
        if HAVE_CUDA:
            torch.cuda.synchronize(device)
        in_use_after = torch.cuda.memory_allocated(device) if HAVE_CUDA else 0
        big = make_input(dtype, c.rank, (64 * c.world_size, 32), 2).to(device)
        growth = []
        for call in _device_calls(c, big):
            before = c.workspace.allocations
            call()
            growth.append(c.workspace.allocations - before)
        grown = c.workspace.allocations
        for call in _device_calls(c, big) + calls:
            call()
        # every rank made every call; now check
        assert repeated == first, "repeated calls allocated staging/scratch memory"
        assert in_use_after == in_use, "GPU memory in use grew across repeated calls"
        assert max(growth) <= len(c.workspace.held), growth
        assert c.workspace.allocations == grown
    finally:
        c.destroy()


def test_prepare_reserves_for_the_first_call(device):
    c = make_comm(device)
    try:
        if not staged(c, device):
            pytest.skip("MPI is CUDA-aware here: nothing is staged")
        world = c.world_size
        model = torch.nn.Module()
        model.embed = torch.nn.Parameter(torch.zeros(24 * world, 64, dtype=torch.bfloat16))
        model.proj = torch.nn.Linear(64, 48)
        model.to(device)
        c.prepare_communication_buffer_for_model(model)
        reserved = c.workspace.allocations
        assert reserved > 0
        big = make_input(torch.bfloat16, c.rank, (24 * world, 64), 4).to(device)
        c.all_reduce(big)
        c.all_reduce(model.proj.weight.detach())
        c.reduce_scatter(big, 0)
        c.all_gather(big[:24], 0)
        assert c.workspace.allocations == reserved
    finally:
        c.destroy()


def test_cpu_and_cuda_inputs_mixed_on_one_communicator(comm, device):
    """Results land on each input's device; CPU and device inputs alternate freely."""
    world, rank = comm.world_size, comm.rank
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        xs = [make_input(dtype, i, (2 * world, 3), 9) for i in range(world)]
        total = reference_sum(xs)
        for where in ("cpu", device, "cpu", device):
            x = xs[rank].to(where)
            summed = comm.all_reduce(x)
            gathered = comm.all_gather(x, 0)
            scattered = comm.reduce_scatter(x, 0)
            for result in (summed, gathered, scattered):
                assert result.device == x.device
            assert conformance.matches(conformance.Outcome("sum", summed.cpu(), total, True))
            assert conformance.equal_bits(gathered.cpu(), torch.cat(xs))
            chunk = total.chunk(world)[rank]
            assert conformance.matches(conformance.Outcome("rs", scattered.cpu(), chunk, True))
        mixed = comm.all_gatherv([xs[rank].to(device), xs[rank][:, :1].cpu()], 0)
        assert mixed[0].device == torch.device(device) and mixed[1].device.type == "cpu"
        assert conformance.equal_bits(mixed[0].cpu(), torch.cat(xs))
        assert conformance.equal_bits(mixed[1], torch.cat([x[:, :1] for x in xs]))


@needs_gpu
def test_rejects_a_tensor_on_another_gpu(device):
    """A communicator for another GPU refuses this GPU's tensors on every rank, before any MPI
    call (so no rank is left waiting), and stays usable."""
    other = torch.device("cuda", (device.index + 1) % max(2, torch.cuda.device_count()))
    c = MPICommunicator(MPI.COMM_WORLD, device=other, timeout=TIMEOUT)
    try:
        x = torch.ones(4 * c.world_size, device=device)
        calls = {
            "all_reduce": lambda: c.all_reduce(x),
            "all_gather": lambda: c.all_gather(x),
            "all_gatherv": lambda: c.all_gatherv([x]),
            "reduce_scatter": lambda: c.reduce_scatter(x),
            "reduce_scatterv": lambda: c.reduce_scatterv(x, 0),
            "gather": lambda: c.gather(x),
            "broadcast": lambda: c.broadcast(x),
            "send": lambda: c.send(x),
        }
        for name, call in calls.items():
            with pytest.raises(ValueError, match=f"serves {other}"):
                call()
            assert name
        # CPU tensors are still accepted, and the communicator still works.
        assert torch.equal(c.all_reduce(torch.ones(3)), torch.full((3,), float(c.world_size)))
    finally:
        c.destroy()


@needs_gpu
def test_device_without_index_means_the_current_gpu(device):
    c = MPICommunicator(MPI.COMM_WORLD, device="cuda", timeout=TIMEOUT)
    try:
        result = c.all_reduce(torch.ones(5, device=device))
        assert result.device == device
        assert torch.equal(result.cpu(), torch.full((5,), float(c.world_size)))
    finally:
        c.destroy()


@needs_gpu
def test_waits_for_the_producing_stream(comm, device):
    """Inputs written by kernels still queued (on the default or a side stream) are read only
    once written; results freed while kernels still use them are not overwritten early."""
    world, rank = comm.world_size, comm.rank
    expected = float(world * (world + 1) // 2)
    side = torch.cuda.Stream(device)
    wrong = []  # every rank makes every call; assert at the end
    for stream in (torch.cuda.current_stream(device), side):
        with torch.cuda.stream(stream):
            for dtype in (torch.float32, torch.bfloat16):
                for i in range(3):
                    x = torch.zeros(1 << 16, dtype=dtype, device=device)
                    torch.cuda._sleep(50_000_000)  # keep the stream busy (~25 ms)
                    x.fill_(rank + 1)
                    summed = comm.all_reduce(x)
                    pending = summed * 2  # queued reader of the result
                    del summed
                    gathered = comm.all_gather(x, 0)
                    src = comm.broadcast(x, world - 1)
                    label = f"{stream}/{dtype}/{i}"
                    if not torch.all(pending == 2 * expected).item():
                        wrong.append(f"all_reduce {label}")
                    firsts = gathered.view(world, -1)[:, 0].float().cpu()
                    if not torch.equal(firsts, torch.arange(1, world + 1, dtype=torch.float32)):
                        wrong.append(f"all_gather {label}")
                    if not torch.all(src == world).item():
                        wrong.append(f"broadcast {label}")
        torch.cuda.synchronize(device)
    assert not wrong, wrong


@needs_gpu
@pytest.mark.parametrize("world", [2, 4])  # 2: torch's own 16-bit add; 4: widened rows
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_rank_order_sum_on_gpu_matches_cpu(device, dtype, world):
    """The device-side reduction of the bytes algorithm gives the CPU's bits (fp32, rank order,
    one rounding)."""
    from mpicomm.buffers import Workspace
    from mpicomm.dtypes import DTYPES

    info = DTYPES[dtype]
    parts = torch.randn(world, 4099, dtype=torch.float32).clamp(-100, 100).to(dtype)
    out_cpu = torch.empty(4099, dtype=dtype)
    out_gpu = torch.empty(4099, dtype=dtype, device=device)
    sum_in_rank_order(parts, out_cpu, info, Workspace())
    sum_in_rank_order(parts.to(device), out_gpu, info, Workspace())
    assert conformance.equal_bits(out_gpu.cpu(), out_cpu)
