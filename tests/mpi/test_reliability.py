"""Reliability on every rank (any rank count): lazy views through every collective, send and
dispatch; lists whose entries differ on one rank under validation; numpy integers; settings and
sizes that differ between ranks; intercommunicators. See docs/reliability.md."""

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpicomm
from tests.helpers import everywhere

pytestmark = pytest.mark.mpi

RANK, W = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def lazy(rank: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s lazy view of ``kind`` (4 rows) and its values as a plain tensor."""
    base = torch.arange(4 * W * 2, dtype=torch.float64).reshape(4 * W, 2)[:4] + 10 * rank
    if kind == "conj":
        z = torch.complex(base, base - 3)
        view = z.conj()
    else:
        view = torch._neg_view(-base)  # contiguous, negative bit set: memory holds -base
    assert view.is_conj() or view.is_neg()
    return view, view.resolve_conj().resolve_neg()


@pytest.mark.parametrize("staging", [False, True])
@pytest.mark.parametrize("kind", ["conj", "neg"])
def test_lazy_views_give_their_values_everywhere(kind, staging):
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="lazy", staging=staging)
    try:
        views = [lazy(r, kind) for r in range(W)]
        x, _ = views[RANK]
        plain = [v for _, v in views]
        ok = torch.equal(comm.all_reduce(x), torch.stack(plain).sum(0))
        ok &= torch.equal(comm.all_gather(x, 0), torch.cat(plain))
        ok &= torch.equal(comm.all_gather(x, 1), torch.cat(plain, 1))
        ok &= torch.equal(comm.all_gatherv([x, x], 0)[1], torch.cat(plain))
        total = torch.stack(plain).sum(0)
        ok &= torch.equal(comm.reduce_scatter(torch.cat([x] * W), 0), total)
        out = comm.gather(x, 0, 0)
        ok &= torch.equal(out, torch.cat(plain)) if RANK == 0 else out is None
        ok &= torch.equal(comm.broadcast(x, W - 1), plain[W - 1])
        h, lg = comm.dispatch(x, x)
        ok &= torch.equal(h, torch.cat(plain)) and torch.equal(lg, torch.cat(plain))
        if W > 1:
            if RANK == 0:
                comm.send(x, 1)
            elif RANK == 1:
                ok &= torch.equal(comm.recv(x.shape, x.dtype, 0), plain[0])
        assert everywhere(bool(ok))
    finally:
        comm.destroy()


@pytest.mark.skipif(W < 2, reason="needs a rank that differs")
@pytest.mark.parametrize("change", ["length", "dtype", "trailing shape"])
def test_validation_covers_every_tensor_of_a_list(change):
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="lists", validate=True, timeout=60)
    try:
        x, second = torch.zeros(2, 3), torch.zeros(2, 4)
        tensors = [x, second]
        if RANK == W - 1:
            if change == "length":
                tensors = [x, second, second]
            elif change == "dtype":
                tensors = [x, second.double()]
            else:
                tensors = [x, torch.zeros(2, 5)]
        with pytest.raises(ValueError, match="disagree on the list of tensors"):
            comm.all_gatherv(tensors, 0)
        # dispatch: the extra tensors are checked too (router_logits here)
        logits = torch.zeros(2, 4) if RANK != W - 1 else torch.zeros(2, 4, dtype=torch.float64)
        with pytest.raises(ValueError, match="disagree on the list of tensors"):
            comm.dispatch(x, logits)
        assert comm.broken is None  # nothing moved: still usable
        assert everywhere(torch.equal(comm.all_gatherv([x, second], 0)[0], torch.zeros(2 * W, 3)))
    finally:
        comm.destroy()


def test_numpy_integers_everywhere(comm):
    x = torch.full((2, 3), float(RANK))
    ok = torch.equal(
        comm.all_gather(x, np.int64(-1)),
        torch.cat([torch.full((2, 3), float(r)) for r in range(W)], 1),
    )
    ok &= torch.equal(comm.broadcast(x, np.int32(W - 1)), torch.full((2, 3), float(W - 1)))
    sizes = np.full(W, 2, dtype=np.int64)
    ok &= comm.all_gatherv(x, np.int8(0), sizes).shape == (2 * W, 3)
    if W > 1:
        if RANK == 0:
            comm.send(x, np.int64(1))
        elif RANK == 1:
            ok &= torch.equal(comm.recv((2, 3), torch.float32, np.int64(0)), torch.zeros(2, 3))
    assert everywhere(bool(ok))


@pytest.mark.skipif(W < 2, reason="needs two ranks")
def test_send_to_itself_is_rejected(comm):
    with pytest.raises(ValueError, match=f"dst={RANK} is this rank"):
        comm.send(torch.zeros(1 << 18), RANK)  # 1 MiB: above any eager limit
    with pytest.raises(ValueError, match=f"src={RANK} is this rank"):
        comm.recv((2,), torch.float32, RANK)


@pytest.mark.skipif(W < 2, reason="needs ranks whose settings differ")
@pytest.mark.parametrize(
    ("options", "named"),
    [
        (lambda r: {"timeout": 30 if r == 0 else None}, "timeout (MPICOMM_TIMEOUT)"),
        (lambda r: {"validate": r == W - 1}, "validate (MPICOMM_VALIDATE)"),
        (lambda r: {"allreduce_algo": "bytes" if r else "native"}, "allreduce_algo"),
        (lambda r: {"staging": r == W - 1}, "staging (MPICOMM_STAGING)"),
        (lambda r: {"all2all_backend": "sparse_alltoallv" if r else None}, "all2all_backend"),
    ],
)
def test_settings_that_differ_between_ranks_raise_everywhere(options, named):
    given = {k: v for k, v in options(RANK).items() if v is not None or k == "timeout"}
    with pytest.raises(ValueError, match="disagree on settings that must match") as info:
        mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="differ", **given)
    assert named in str(info.value)
    # nothing was left behind: a communicator with matching settings still works
    c = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="same", timeout=30)
    assert everywhere(torch.equal(c.all_reduce(torch.ones(2)), torch.full((2,), float(W))))
    c.destroy()


@pytest.mark.skipif(W < 2, reason="needs a rank that fails alone")
@pytest.mark.parametrize(
    ("bad", "own_error"),
    [
        ({"allreduce_algo": "bogus"}, ValueError),
        ({"device": "meta"}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"validate": "maybe"}, ValueError),
        ({"shm": 2.5}, ValueError),
        ({"unique_name": 3}, TypeError),
        ({"all2all_backend": "pigeons"}, ValueError),
    ],
)
def test_a_rank_that_fails_a_check_at_construction_fails_it_everywhere(bad, own_error):
    """The last rank's first communicator fails a local check: every rank raises (before, the
    others waited in the constructor forever, timeout or not)."""
    sub = MPI.COMM_WORLD.Dup()  # a group whose first communicator this is
    try:
        options = bad if RANK == W - 1 else {}
        if RANK == W - 1:
            with pytest.raises(own_error):
                mpicomm.MPICommunicator(sub, **{"unique_name": "first", **options})
        else:
            with pytest.raises(ValueError, match=f"could not be built on every rank.*rank {W - 1}"):
                mpicomm.MPICommunicator(sub, unique_name="first", timeout=60)
        c = mpicomm.MPICommunicator(sub, unique_name="then")  # nothing was left behind
        assert everywhere(torch.equal(c.all_reduce(torch.ones(2)), torch.full((2,), float(W))))
        c.destroy()
    finally:
        sub.Free()


@pytest.mark.skipif(W < 2, reason="needs ranks whose sizes differ")
def test_model_parallel_sizes_that_differ_raise_everywhere():
    with pytest.raises(ValueError, match="the ranks passed different sizes"):
        mpicomm.initialize_model_parallel(tensor_parallel_size=1 if RANK == 0 else W)
    bad = "x" if RANK == 0 else 1
    if RANK == 0:
        with pytest.raises(TypeError, match="tensor_parallel_size must be an int"):
            mpicomm.initialize_model_parallel(tensor_parallel_size=bad)
    else:
        with pytest.raises(ValueError, match="invalid sizes on other ranks"):
            mpicomm.initialize_model_parallel(tensor_parallel_size=bad)
    groups = mpicomm.initialize_model_parallel(tensor_parallel_size=np.int64(W))
    assert groups.tp.world_size == W
    groups.destroy()


@pytest.mark.skipif(W < 2, reason="an intercommunicator needs two groups")
def test_intercommunicators_are_rejected():
    half = MPI.COMM_WORLD.Split(RANK % 2, RANK)
    inter = half.Create_intercomm(0, MPI.COMM_WORLD, 1 - RANK % 2, 5)
    try:
        with pytest.raises(TypeError, match="cpu_group is an intercommunicator"):
            mpicomm.MPICommunicator(inter)
        with pytest.raises(TypeError, match="comm is an intercommunicator"):
            mpicomm.initialize_model_parallel(comm=inter)
    finally:
        inter.Free()
        half.Free()


@pytest.mark.parametrize("shm", ["0", "auto"])
@pytest.mark.parametrize("shift", [1, -1, 0])
def test_out_overlapping_the_input_through_another_storage(shm, shift):
    """``out`` over the same memory as the input but another storage (two tensors made from
    one numpy array): the sum is computed as if out were separate (before, with the storages
    compared by address, MPI wrote into the input while reading it)."""
    n = 50_000  # 200 KiB: a sum that MPI runs in steps, reading the input after writing out
    memory = np.arange(n + 1, dtype=np.float32) + RANK
    lo, hi = torch.from_numpy(memory[:-1]), torch.from_numpy(memory[1:])
    x, out = (lo, hi) if shift >= 0 else (hi, lo)
    if shift == 0:
        out = torch.from_numpy(memory[:-1])  # the same memory, another storage: in place
    want = sum(x.clone() + (r - RANK) for r in range(W))
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="alias", shm=shm)
    try:
        got = comm.all_reduce(x, out=out)
        assert got is out
        assert everywhere(torch.equal(out, want))
    finally:
        comm.destroy()


def test_a_forked_child_is_refused_and_the_parent_stays_in_step():
    """A child made by fork() is no rank of the group: its call raises CommunicationError at
    once (before, it entered the parent's shared-memory protocol or MPI: a hang, or the
    parent's next result taken by the child), and the parent's next call is exact."""
    import os
    import signal
    import time

    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="parent")
    try:
        assert everywhere(torch.equal(comm.all_reduce(torch.ones(4)), torch.full((4,), float(W))))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                comm.all_reduce(torch.ones(4))
                text = "no error"
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                text = f"{type(exc).__name__}: {exc}"
            comm.destroy()  # no MPI call in the child
            os.write(write, text.encode())
            os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 20
        ended = False
        while not ended and time.monotonic() < deadline:
            ended = os.waitpid(pid, os.WNOHANG) != (0, 0)
            time.sleep(0.05)
        if not ended:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        said = os.read(read, 4096).decode()
        os.close(read)
        ok = said.startswith("CommunicationError") and "forked" in said
        ok &= torch.equal(comm.all_reduce(torch.ones(4)), torch.full((4,), float(W)))
        assert everywhere(ok), said
    finally:
        comm.destroy()


def _large_results(comm: mpicomm.MPICommunicator) -> dict[str, torch.Tensor | None]:
    """A result of at least ``RECYCLE_FROM`` bytes from every collective that returns one."""
    from mpicomm.buffers import RECYCLE_FROM

    n = RECYCLE_FROM // 4  # float32 elements of one large result
    x = torch.full((n // 4, 4), float(RANK + 1))
    big = torch.ones(W * n // 4, 4)
    rows = [n // 4] * W
    results = {
        "all_reduce": comm.all_reduce(x),
        "all_gather": comm.all_gather(x, 0),
        "all_gatherv": comm.all_gatherv(x, 0),
        "reduce_scatter": comm.reduce_scatter(big, 0),
        "reduce_scatterv": comm.reduce_scatterv(big, 0),
        "gather": comm.gather(x, 0, 0),
        "broadcast": comm.broadcast(x, 0),
        "all_to_allv": comm.all_to_allv(big, rows, rows),
        "dispatch": comm.dispatch(x, x)[0],
    }
    if W > 1:
        if RANK == 0:
            comm.send(x, 1)
        results["recv"] = comm.recv(x.shape, x.dtype, 0) if RANK == 1 else None
    return results


@pytest.mark.parametrize("shm", ["0", "auto"])
def test_large_results_are_resizable(shm):
    """Results of 4 MiB and more (recycled memory, docs/reliability.md) resize like any fresh
    tensor: shrunk to nothing, grown, used, their storage freed; the second round's results take
    recycled storages (before, made by ``torch.frombuffer``: 'not resizable')."""
    from mpicomm.buffers import recycler

    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="resize", shm=shm)
    failed = []
    try:
        for _ in range(2):  # the first round's results are freed before the second's are made
            for name, out in _large_results(comm).items():
                if out is None:
                    continue
                try:
                    n = out.numel()
                    out.resize_(0)
                    out.resize_(2 * n).fill_(2.0)
                    if float(out.sum()) != 4.0 * n:
                        failed.append(name)
                    out.untyped_storage().resize_(0)
                except RuntimeError as exc:
                    failed.append(f"{name}: {exc}")
        assert everywhere(not failed), failed
        assert not recycler.available or recycler.reused > 0
    finally:
        comm.destroy()


@pytest.mark.skipif(W < 2, reason="needs ranks whose sizes differ")
def test_all_to_allv_per_peer_sizes_that_disagree_raise_everywhere():
    """Under validation, rank s's send_rows[d] must be rank d's recv_rows[s]: the last rank
    expects one row more from rank 0 than rank 0 sends. Every rank raises the same ValueError
    before any payload moves (the torch backend's all_to_all and the MoE routers reach MPI through
    this call), and the communicator stays usable."""
    comm = mpicomm.MPICommunicator(MPI.COMM_WORLD, unique_name="a2a", validate=True, timeout=60)
    try:
        send = [d + 1 for d in range(W)]  # rows to each rank
        recv = [RANK + 1] * W
        x = torch.arange(sum(send) * 2, dtype=torch.float32).reshape(-1, 2)
        if RANK == W - 1:
            recv[0] += 1
        with pytest.raises(ValueError) as caught:
            comm.all_to_allv(x, send, recv)
        message = str(caught.value)
        named = f"rank 0's send_rows[{W - 1}]={W} but rank {W - 1}'s recv_rows[0]={W + 1}"
        ok = "the ranks disagree on the per-peer sizes" in message and named in message
        assert everywhere(ok), message
        assert len(set(MPI.COMM_WORLD.allgather(message))) == 1, message
        assert comm.broken is None
        recv[0] = RANK + 1
        got = comm.all_to_allv(x, send, recv)
        assert everywhere(got.shape == (W * (RANK + 1), 2))
    finally:
        comm.destroy()
