"""mpicomm.calls in one process (COMM_SELF): method names, MPI errors, the broken state, timeouts
and the arrival notices."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpicomm import calls
from mpicomm.calls import Arrivals, Caller, nonblocking
from mpicomm.errors import CollectiveTimeoutError, CommunicationError


@pytest.mark.parametrize(
    ("blocking", "twin"),
    [
        ("Allreduce", "Iallreduce"),
        ("Allgatherv", "Iallgatherv"),
        ("Reduce_scatter", "Ireduce_scatter"),
        ("Bcast", "Ibcast"),
        ("Recv", "Irecv"),
        ("Mprobe", "Improbe"),
    ],
)
def test_nonblocking_names_an_mpi4py_method(blocking, twin):
    assert nonblocking(blocking) == twin
    assert callable(getattr(MPI.COMM_SELF, twin))


def test_calls_run_and_return_what_mpi4py_returns():
    call = Caller("tp")
    out = np.zeros(3)
    assert call("all_reduce", MPI.COMM_SELF, "Allreduce", np.arange(3.0), out) is None
    assert out.tolist() == [0.0, 1.0, 2.0]
    # Allgatherv runs as Iallgatherv + Wait (faster on MPICH); the result is the same.
    got = np.zeros(4, dtype=np.int32)
    call("all_gatherv", MPI.COMM_SELF, "Allgatherv", np.arange(4, dtype=np.int32), [got, [4]])
    assert got.tolist() == [0, 1, 2, 3]
    assert call("size", MPI.COMM_SELF, "Get_size") == 1
    assert call.broken is None


def test_mpi_error_becomes_communication_error_naming_operation_and_group():
    call = Caller("tp-group")
    with pytest.raises(CommunicationError) as info:
        # rank 5 does not exist in COMM_SELF
        call("send_recv", MPI.COMM_SELF, "Send", np.zeros(1), 5, 0)
    err = info.value
    assert not isinstance(err, CollectiveTimeoutError)
    assert str(err).startswith("send_recv on group 'tp-group' failed in MPI_Send: ")
    assert (err.operation, err.group) == ("send_recv", "tp-group")
    assert isinstance(err.__cause__, MPI.Exception)
    assert err.__cause__.Get_error_string() in str(err)


class _RecordingComm:
    def __init__(self):
        self.calls = []

    def Barrier(self):
        self.calls.append("Barrier")


def test_a_broken_caller_refuses_every_call():
    comm = _RecordingComm()
    call = Caller("dp")
    call("barrier", comm, "Barrier")
    assert comm.calls == ["Barrier"]
    call.broken = "all_reduce timed out after 1 s"
    with pytest.raises(CommunicationError) as info:
        call("barrier", comm, "Barrier")
    assert comm.calls == ["Barrier"]  # MPI was not called again
    assert (info.value.operation, info.value.group) == ("barrier", "dp")
    assert "unusable after an earlier failure (all_reduce timed out after 1 s)" in str(info.value)


def test_timeout_raises_marks_broken_and_keeps_the_request_alive():
    """A receive nobody sends: it times out, and its request and buffer stay owned by the caller
    (MPI may still write into them), as a late message then shows."""
    call = Caller("ep", timeout=0.2)
    box = np.zeros(2)
    with pytest.raises(CollectiveTimeoutError) as info:
        call("dispatch", MPI.COMM_SELF, "Recv", box, 0, 77)
    err = info.value
    assert err.timeout == 0.2 and (err.operation, err.group) == ("dispatch", "ep")
    assert "dispatch on group 'ep' did not complete within 0.2 s (MPICOMM_TIMEOUT)" in str(err)
    assert call.broken == "dispatch timed out after 0.2 s"
    assert_kept_alive(call, box, 77)


def assert_kept_alive(call: Caller, box: np.ndarray, tag: int) -> None:
    """``call`` holds one abandoned receive into ``box`` (tag ``tag``) and refuses new calls;
    the receive is still posted: a late message lands in ``box``."""
    assert call.outstanding == 1
    with pytest.raises(CommunicationError, match="unusable after an earlier failure"):
        call("again", MPI.COMM_SELF, "Recv", np.zeros(2), 0, tag + 1)
    ((request, _args),) = call._abandoned
    MPI.COMM_SELF.Send(np.array([3.0, 4.0]), 0, tag)
    request.Wait()
    assert box.tolist() == [3.0, 4.0]


def test_an_interrupt_while_polling_keeps_the_request_and_breaks_the_caller(monkeypatch):
    """Ctrl-C (KeyboardInterrupt) in a timed wait: the receive stays posted with its buffer, and
    the caller refuses further calls, as after a timeout."""
    call = Caller("ep", timeout=30)
    box = np.zeros(2)

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(calls.time, "sleep", interrupt)  # the first sleep of the wait
    with pytest.raises(KeyboardInterrupt):
        call("recv", MPI.COMM_SELF, "Recv", box, 0, 41)
    monkeypatch.undo()
    assert call.broken == "recv was interrupted by KeyboardInterrupt while waiting"
    assert_kept_alive(call, box, 41)


def test_a_system_exit_while_polling_breaks_the_caller(monkeypatch):
    call = Caller("ep", timeout=30)
    monkeypatch.setattr(calls.time, "sleep", lambda s: (_ for _ in ()).throw(SystemExit(3)))
    with pytest.raises(SystemExit):
        call.probe("recv", MPI.COMM_SELF, 0, 43)
    assert call.broken == "recv was interrupted by SystemExit while waiting"
    assert call.outstanding == 1


def test_probe_timeout_names_the_rank_that_sent_nothing():
    call = Caller("pp", timeout=0.15)
    with pytest.raises(CollectiveTimeoutError) as info:
        call.probe("recv", MPI.COMM_SELF, 0, 5)
    assert info.value.missing == [0]
    assert "Group rank 0 had sent nothing." in str(info.value)
    assert call.broken == "recv timed out after 0.15 s"


def test_probe_returns_the_waiting_message():
    call = Caller("pp", timeout=5)
    sent = np.array([7], dtype=np.int64)
    send = MPI.COMM_SELF.Isend(sent, 0, 9)  # completes once received (a send to self)
    message, status = call.probe("recv", MPI.COMM_SELF, 0, 9)
    assert status.Get_source() == 0 and status.Get_tag() == 9
    got = np.zeros(1, dtype=np.int64)
    message.Recv(got)
    send.Wait()
    assert got[0] == 7 and call.broken is None


def test_timed_collective_counts_arrivals_and_close_frees_them():
    call = Caller("tp", timeout=5)
    call.prepare(MPI.COMM_SELF)
    assert call.size == 1 and call.arrivals is not None
    out = np.zeros(2)
    call("all_reduce", MPI.COMM_SELF, "Allreduce", np.array([1.0, 2.0]), out)
    call("all_reduce", MPI.COMM_SELF, "Allreduce", np.array([1.0, 2.0]), out)
    assert out.tolist() == [1.0, 2.0]
    assert call.arrivals.seq == 2 and call.arrivals.seen == [2]
    dup = call.arrivals.comm
    call.close()
    assert call.arrivals is None and dup == MPI.COMM_NULL


def test_arrivals_on_comm_self():
    arrivals = Arrivals(MPI.COMM_SELF.Dup())
    assert (arrivals.rank, arrivals.size) == (0, 1)
    assert arrivals.enter() == 1 and arrivals.enter() == 2
    assert arrivals.seen == [2] and arrivals.sends == []  # no peers: nothing sent
    assert arrivals.missing(2) == []
    assert arrivals.missing(3) == [0]  # this rank has not entered a third collective
    arrivals.close(timeout=5)
    assert arrivals.comm == MPI.COMM_NULL
