"""Reliability in one process (COMM_SELF): lazy views, list fingerprints,
settings, bad communicators and devices, numpy integers, self-sends, error texts, the exit warning.
The cases that need their own job: tests/jobs/test_reliability.py. Interrupted waits:
tests/unit/test_calls.py. See docs/reliability.md."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpicomm
from mpicomm import consistency, ops, tracking
from mpicomm.calls import Caller
from mpicomm.config import settings
from mpicomm.errors import CollectiveTimeoutError, CommunicationError
from mpicomm.validation import check_rank, check_shape, check_sizes, check_tensor, normalize_dim
from tests.helpers import MPI_LAUNCHER_PREFIXES, child_env


@pytest.fixture
def comm():
    c = mpicomm.MPICommunicator(MPI.COMM_SELF, unique_name="self")
    yield c
    c.destroy()


def _lazy_views():
    z = torch.tensor([[1 + 2j, 3 - 1j], [-2 + 0.5j, 4j]], dtype=torch.complex64)
    return {
        "conj": z.conj(),  # memory holds z, values are conj(z)
        "neg": torch._neg_view(-torch.arange(4.0).reshape(2, 2)),  # contiguous negative bit
        "conj().imag": z[:1, :1].conj().imag.reshape(1),  # one element: contiguous, negative
    }


@pytest.mark.parametrize("staging", [False, True])
@pytest.mark.parametrize("name", ["conj", "neg", "conj().imag"])
def test_lazy_views_are_sent_as_their_values(name, staging):
    view = _lazy_views()[name]
    assert view.is_conj() or view.is_neg()
    want = view.resolve_conj().resolve_neg()
    c = mpicomm.MPICommunicator(MPI.COMM_SELF, unique_name="lazy", staging=staging)
    try:
        assert torch.equal(c.all_reduce(view), want)
        assert torch.equal(c.all_gather(view, 0), want.reshape(-1) if view.dim() == 0 else want)
        assert torch.equal(c.all_gatherv([view, view], 0)[1], want)
        assert torch.equal(c.reduce_scatter(view, 0), want)
        assert torch.equal(c.gather(view, 0, 0), want)
        assert torch.equal(c.broadcast(view, 0), want)
        assert torch.equal(c.all_to_allv(view, [view.shape[0]], [view.shape[0]]), want)
        h, lg = c.dispatch(view, view)
        assert torch.equal(h, want) and torch.equal(lg, want)
    finally:
        c.destroy()


def test_the_timeout_hint_knows_whether_validation_is_on():
    for validating, hint in [(False, "MPICOMM_VALIDATE=1 checks that"), (True, "is on")]:
        call = Caller("tp", timeout=0.15)
        call.validating = validating
        call.prepare(MPI.COMM_SELF)
        request = MPI.COMM_SELF.Irecv(np.zeros(1), 0, 44)
        with pytest.raises(CollectiveTimeoutError) as info:
            # a "collective" that never completes, with every rank (this one) arrived
            call._poll(
                "all_reduce",
                request.Test,
                (request,),
                call._who("x", MPI.COMM_SELF, "Allreduce", ()),
            )
        assert hint in str(info.value)
        if validating:
            assert "MPICOMM_VALIDATE=1 checks that" not in str(info.value)
        MPI.COMM_SELF.Send(np.zeros(1), 0, 44)
        request.Wait()


def test_fingerprints_cover_every_tensor_of_a_list():
    x = torch.zeros(3, 4)
    base = consistency.fingerprint("all_gatherv", [x, torch.zeros(3, 2)], 0, rows_vary=True)
    same = consistency.fingerprint(
        "all_gatherv", [torch.ones(5, 4), torch.ones(5, 2)], 0, rows_vary=True
    )
    assert np.array_equal(base.row, same.row)  # rows may differ, values never matter
    for other in (
        [x],  # shorter list
        [x, torch.zeros(3, 2), torch.zeros(3)],  # longer list
        [x, torch.zeros(3, 2, dtype=torch.float64)],  # second dtype
        [x, torch.zeros(3, 3)],  # second trailing shape
        [x, torch.zeros(3, 2, 1)],  # second number of dimensions
    ):
        row = consistency.fingerprint("all_gatherv", other, 0, rows_vary=True).row
        assert not np.array_equal(row, base.row), other
        fields = consistency.differences(np.stack([base.row, row]))
        assert fields == ["the list of tensors (length, dtypes or shapes)"]
    # a one-entry list is the same call as the tensor itself
    one = consistency.fingerprint("all_gatherv", [x], 0, rows_vary=True).row
    assert np.array_equal(one, consistency.fingerprint("all_gatherv", x, 0, rows_vary=True).row)
    assert ", 2 tensors#" in consistency.describe(base.row)


@pytest.mark.parametrize("raw", ["0", "0.0", "00", "0e3", " 0 "])
def test_every_spelling_of_zero_turns_the_timeout_off(monkeypatch, raw):
    monkeypatch.setenv("MPICOMM_TIMEOUT", raw)
    assert settings().timeout is None


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "-1", "1s"])
def test_a_timeout_that_is_not_a_finite_number_is_rejected(monkeypatch, raw):
    monkeypatch.setenv("MPICOMM_TIMEOUT", raw)
    with pytest.raises(ValueError, match="MPICOMM_TIMEOUT must be"):
        settings()
    monkeypatch.delenv("MPICOMM_TIMEOUT")
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number of seconds"):
            mpicomm.MPICommunicator(MPI.COMM_SELF, timeout=value)


def test_log_level_is_applied_to_the_mpicomm_logger(monkeypatch):
    logger = logging.getLogger("mpicomm")
    level, handlers = logger.level, list(logger.handlers)
    monkeypatch.setenv("MPICOMM_LOG_LEVEL", "debug")
    try:
        mpicomm.MPICommunicator(MPI.COMM_SELF).destroy()
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
    monkeypatch.setenv("MPICOMM_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="MPICOMM_LOG_LEVEL must be a logging level"):
        settings()


def test_bad_communicators_and_devices_are_rejected_at_construction():
    with pytest.raises(ValueError, match="cpu_group is MPI.COMM_NULL"):
        mpicomm.MPICommunicator(MPI.COMM_NULL)
    with pytest.raises(ValueError, match="device_group is MPI.COMM_NULL"):
        mpicomm.MPICommunicator(MPI.COMM_SELF, device_group=MPI.COMM_NULL)
    with pytest.raises(ValueError, match="comm is MPI.COMM_NULL"):
        mpicomm.initialize_model_parallel(comm=MPI.COMM_NULL)
    with pytest.raises(ValueError, match="cpu and cuda devices only"):
        mpicomm.MPICommunicator(MPI.COMM_SELF, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            mpicomm.MPICommunicator(MPI.COMM_SELF, device="cuda")


def test_nested_tensors_are_rejected(comm):
    nested = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    with pytest.raises(TypeError, match="nested tensor"):
        check_tensor(nested)
    with pytest.raises(TypeError, match="nested tensor"):
        comm.all_reduce(nested)


def test_numpy_integers_are_accepted_like_ints(comm):
    assert normalize_dim(np.int64(-1), 3) == 2 and check_rank(np.int32(0), 1, "dst") == 0
    assert check_sizes(np.array([2, 3]), 2) == [2, 3]
    assert check_sizes([np.int64(2), np.uint8(3)], 2) == [2, 3]
    assert check_shape((np.int64(2), 3)) == (2, 3)
    for bad in (True, np.bool_(True), 1.0):
        with pytest.raises(TypeError):
            normalize_dim(bad, 3)
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(comm.all_gather(x, np.int64(1)), x)
    assert torch.equal(comm.gather(x, np.int64(0), np.int32(0)), x)
    assert torch.equal(comm.broadcast(x, np.int64(0)), x)
    assert torch.equal(comm.all_gatherv(x, np.int64(0), np.array([2])), x)
    assert torch.equal(comm.reduce_scatterv(x, np.int8(0), [np.int64(2)]), x)
    h, _ = comm.dispatch(x, x, sizes=np.array([2]))
    assert torch.equal(h, x)
    assert comm.recv  # recv's src takes numpy ints too (tested with peers in tests/mpi)


def test_send_and_recv_to_this_rank_are_rejected(comm):
    with pytest.raises(ValueError, match="dst=0 is this rank"):
        comm.send(torch.zeros(1 << 16))  # the default peer of a one-rank group is itself
    with pytest.raises(ValueError, match="src=0 is this rank"):
        comm.recv((4,), torch.float32, 0)
    assert comm.broken is None


def test_combine_after_destroy_says_destroyed():
    c = mpicomm.MPICommunicator(MPI.COMM_SELF, unique_name="moe")
    c.dispatch(torch.zeros(2, 3), torch.zeros(2, 1))
    c.destroy()
    with pytest.raises(
        CommunicationError, match="combine on group 'moe': the communicator was destroyed"
    ):
        c.combine(torch.zeros(2, 3))
    with pytest.raises(CommunicationError, match="dispatch on group 'moe'"):
        c.dispatch(torch.zeros(2, 3), torch.zeros(2, 1))


def test_fake_all_gather_of_a_0d_tensor_matches_eager(comm):
    from torch._subclasses.fake_tensor import FakeTensorMode

    name = ops.register_communicator(comm, "rel-self", replace=True)
    try:
        eager = ops.all_gather(torch.tensor(2.0), name, 0)
        with FakeTensorMode():
            fake = torch.ops.mpicomm.all_gather(torch.empty(()), 0, 3, name)
        assert eager.shape == (1,) and fake.shape == (3,)
        with pytest.raises(ValueError, match=r"sizes has 2 entries, but group 'rel-self' has 1"):
            ops.all_gatherv(torch.zeros(2, 2), [1, 1], name)
        with pytest.raises(ValueError, match=r"sizes has 2 entries"):
            ops.reduce_scatterv(torch.zeros(2, 2), [1, 1], name, 0, 0)
    finally:
        ops.unregister_communicator(name, comm)


def test_exit_warning_names_communicators_never_destroyed(capsys):
    class Two:
        world_size = 2

    pair, single = Two(), type("One", (), {"world_size": 1})()
    tracking.track(pair, "tp:0")
    tracking.track(single, "self")
    try:
        assert tracking.warn_undestroyed() == ["tp:0"]
        assert "communicator(s) tp:0 never destroyed" in capsys.readouterr().err
        tracking.untrack(pair)
        assert tracking.warn_undestroyed() == []
    finally:
        tracking.untrack(pair)
        tracking.untrack(single)
    c = mpicomm.MPICommunicator(MPI.COMM_SELF)
    assert id(c) in tracking._live
    c.destroy()
    assert id(c) not in tracking._live


def test_cli_reports_a_bad_variable_in_one_line():
    import subprocess
    import sys

    for command, code in (("check", 2), ("bench", 2), ("info", 0)):
        env = child_env({"MPICOMM_TIMEOUT": "soon"}, drop=MPI_LAUNCHER_PREFIXES)
        proc = subprocess.run(
            [sys.executable, "-m", "mpicomm", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == code, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        if code:
            assert proc.stderr.strip() == (
                f"python -m mpicomm {command}: MPICOMM_TIMEOUT must be a number of seconds, "
                f"got 'soon'"
            )
        else:
            assert "MPI library" in proc.stdout


@pytest.mark.parametrize("recycle", [True, False])
def test_large_results_are_resizable(recycle):
    """Results of 4 MiB and more, new or recycled, are ordinary resizable tensors (before,
    recycled ones were ``torch.frombuffer`` views: 'not resizable'; docs/reliability.md)."""
    from mpicomm.buffers import RECYCLE_FROM, ResultMemory, recycler

    memory = ResultMemory(recycle=recycle)
    n = RECYCLE_FROM // 4
    first = memory.empty((n,), torch.float32)
    del first
    reused = recycler.reused
    out = memory.empty((n,), torch.float32)  # the first's storage, when recycling
    assert recycler.reused == reused + (recycle and recycler.available)
    out.resize_(0)
    out.resize_(2 * n).fill_(1.0)
    assert float(out.sum()) == 2 * n
    out.untyped_storage().resize_(0)
    assert out.untyped_storage().nbytes() == 0
