"""mpicomm.buffers on its own (one process, no GPU): workspace growth and the stream bookkeeping
that keeps MPI, which knows no CUDA streams, from writing device scratch memory too early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpicomm.buffers import HUGE_PAGES_FROM, Workspace, thp_mode


def test_slots_grow_and_are_reused():
    ws = Workspace()
    cpu = torch.device("cpu")
    first = ws.raw("parts", 100, cpu)
    assert first.numel() == 100 and ws.allocations == 1
    again = ws.raw("parts", 80, cpu)
    assert again.data_ptr() == first.data_ptr() and ws.allocations == 1
    ws.raw("parts", 1000, cpu)
    assert ws.allocations == 2 and ws.nbytes >= 1000
    shaped = ws.tensor("out", (3, 5), torch.bfloat16, cpu)
    assert shaped.shape == (3, 5) and shaped.dtype is torch.bfloat16 and shaped.is_contiguous()
    ws.clear()
    assert ws.nbytes == 0


class FakeStream:
    """Stands in for torch.cuda.Stream: counts synchronize() calls."""

    def __init__(self) -> None:
        self.waits = 0

    def synchronize(self) -> None:
        self.waits += 1


def test_device_slot_waits_for_the_stream_that_used_it_last(monkeypatch):
    """A device slot handed to another stream than last time first waits for the last one (its
    queued kernels may still read or write the slot); the same stream again waits for nothing;
    clear() waits for every stream that used a slot."""
    a, b = FakeStream(), FakeStream()
    current = [a]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    ws = Workspace()
    gpu = torch.device("cuda", 0)
    parts, tails = ("parts", "cuda:0"), ("tails", "cuda:0")
    ws._claim(parts, gpu)
    ws._claim(parts, gpu)
    ws._claim(tails, gpu)
    assert a.waits == 0
    current[0] = b
    ws._claim(parts, gpu)
    assert a.waits == 1 and b.waits == 0
    ws._claim(parts, gpu)
    assert a.waits == 1
    ws.clear()
    assert a.waits == 2 and b.waits == 1  # tails was last used on a, parts on b


def test_cached_views_follow_growth():
    """The same request returns the same view; after the slot grows, views of the new memory."""
    ws = Workspace()
    cpu = torch.device("cpu")
    a = ws.tensor("tails", (2, 8), torch.float32, cpu)
    assert ws.tensor("tails", (2, 8), torch.float32, cpu) is a
    b = ws.tensor("tails", (2, 8), torch.bfloat16, cpu)
    assert b.data_ptr() == a.data_ptr() and b.dtype is torch.bfloat16
    big = ws.tensor("tails", (64, 64), torch.float32, cpu)  # grows the slot
    again = ws.tensor("tails", (2, 8), torch.float32, cpu)
    assert again is not a and again.data_ptr() == big.data_ptr()


def test_spec_owns_its_tensor_and_refuses_strided_memory():
    """Host memory goes to MPI by address, so the spec must keep the tensor alive (a request
    abandoned after a timeout holds only its specs); strided memory never gets that far."""
    import gc

    from mpi4py import MPI

    from mpicomm.buffers import byte_spec, mpi_spec, vector_spec

    send = mpi_spec(torch.arange(6, dtype=torch.bfloat16) + 1)  # the only reference
    recv = mpi_spec(torch.zeros(6, dtype=torch.bfloat16))
    gc.collect()
    MPI.COMM_SELF.Allgather(send, recv)
    assert torch.equal(recv.tensor, torch.arange(6, dtype=torch.bfloat16) + 1)
    for spec in (byte_spec(torch.ones(3)), vector_spec(torch.ones(4), [4])):
        assert isinstance(spec.tensor, torch.Tensor)
    for make in (mpi_spec, byte_spec):
        try:
            make(torch.ones(4, 4).t())
        except RuntimeError as exc:
            assert "non-contiguous" in str(exc)
        else:
            raise AssertionError(f"{make.__name__} took a transposed tensor")


def _anon_huge_kib(address: int) -> int | None:
    """AnonHugePages (KiB) of the mapping holding ``address`` in /proc/self/smaps, if readable."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return None


def test_large_fresh_results_get_huge_pages():
    """A large fresh result is advised onto 2 MiB pages (so filling it does not fault 4 KiB at a
    time); the memory stays ordinary memory; small results are left alone."""
    from mpicomm.buffers import ResultMemory, huge_pages

    n = max(HUGE_PAGES_FROM, 16 << 20) // 4 + 1024
    big = huge_pages(torch.empty(n, dtype=torch.float32))
    recycled = ResultMemory(huge=True).empty((n,), torch.float32)  # held for reuse
    for result in (big, recycled):
        result.fill_(3.0)
        assert bool((result == 3.0).all())
        if thp_mode() in ("madvise", "always"):
            huge = _anon_huge_kib(result.data_ptr() + (8 << 20))
            if huge is not None:
                assert huge > 0, "the advised result has no huge pages although THP is enabled"
    small = torch.empty(1000)
    assert huge_pages(small) is small


@pytest.mark.parametrize("setting", ["1", "0"])
def test_communicator_huge_pages_follow_the_setting(monkeypatch, setting):
    """Fresh host results are offered huge pages (huge_pages() for new memory, recycled or not)
    unless MPICOMM_HUGE_PAGES=0."""
    from mpi4py import MPI

    import mpicomm
    import mpicomm.buffers as module

    module.recycler.clear()  # a recycled storage is not advised again
    advised = []
    monkeypatch.setattr(module, "huge_pages", lambda t: advised.append(t.nbytes) or t)
    monkeypatch.setenv("MPICOMM_HUGE_PAGES", setting)
    comm = mpicomm.MPICommunicator(MPI.COMM_SELF)
    try:
        big = torch.ones(HUGE_PAGES_FROM // 4)
        assert torch.equal(comm.all_reduce(big), big)
        assert torch.equal(comm.all_gather(big[:8].reshape(2, 4), -1), big[:8].reshape(2, 4))
    finally:
        comm.destroy()
    if setting == "1":  # every fresh host result is offered; huge_pages() itself skips small ones
        assert advised[0] == big.nbytes and len(advised) == 3
    else:
        assert advised == []


def test_large_results_reuse_freed_memory_only():
    """A large result's storage serves a later result only once nothing else holds it: live
    results, views and storage objects keeping one alive never share memory; a storage its user
    resized is not reused."""
    import gc

    from mpicomm.buffers import RECYCLE_FROM, ResultMemory, recycler

    if not recycler.available:
        pytest.skip("this torch cannot count a storage's users: large results are new memory")
    recycler.clear()
    memory = ResultMemory(huge=False)
    n = RECYCLE_FROM // 4 + 16
    a = memory.empty((n,), torch.float32)
    b = memory.empty((n,), torch.float32)
    assert a.data_ptr() != b.data_ptr() and a.is_contiguous() and a.shape == (n,)
    address = a.data_ptr()
    view = a[5:]
    del a
    gc.collect()
    c = memory.empty((n,), torch.float32)
    assert c.data_ptr() != address, "memory reused while a view of its result was alive"
    del view
    gc.collect()
    reused = recycler.reused
    d = memory.empty((2, n // 2), torch.float32)  # same bytes, another shape
    assert d.data_ptr() == address and recycler.reused == reused + 1
    e = memory.empty((n,), torch.float32)  # no block waits: a new one
    assert e.data_ptr() not in (address, b.data_ptr(), c.data_ptr())
    storage = e.untyped_storage()  # the memory stays e's while its storage object lives
    del e
    gc.collect()
    f = memory.empty((n,), torch.float32)
    assert f.data_ptr() != storage.data_ptr()
    small = memory.empty((8,), torch.float32)
    assert small.nbytes < RECYCLE_FROM
    assert recycler.free_bytes == 0
    del b, c, d, f, storage
    gc.collect()
    # five results of 4n bytes were freed: the per_size newest storages wait to be reused
    assert recycler.free_bytes == recycler.per_size * n * 4 <= recycler.max_bytes
    g = memory.empty((n,), torch.float32)
    address = g.data_ptr()
    g.resize_(2 * n)  # new memory: the held storage grows with it
    del g
    gc.collect()
    h = memory.empty((n,), torch.float32)
    assert h.data_ptr() != address and h.untyped_storage().nbytes() == 4 * n


def test_recycling_off_gives_new_memory(monkeypatch):
    import gc

    from mpi4py import MPI

    import mpicomm
    from mpicomm.buffers import RECYCLE_FROM, recycler

    recycler.clear()
    reused = recycler.reused
    monkeypatch.setenv("MPICOMM_RECYCLE", "0")
    comm = mpicomm.MPICommunicator(MPI.COMM_SELF)
    try:
        x = torch.ones(RECYCLE_FROM // 4)
        for _ in range(3):
            assert torch.equal(comm.all_reduce(x), x)
            gc.collect()
        assert recycler.reused == reused and recycler.free_bytes == 0
    finally:
        comm.destroy()
