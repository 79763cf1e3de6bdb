"""Fault injection: each injected fault ends the job within a bound, non-zero, with a clear error.

Every case runs ``tests/programs/faults/inject.py CASE`` under ``timeout N mpiexec -n K``; the ranks write
what they saw to files (an aborted job may lose its stdout), which these tests read.
"""

from __future__ import annotations

import json
import time

from tests.helpers import PROGRAMS, run_mpi

SCRIPT = PROGRAMS / "faults" / "inject.py"
TIMEOUT = 3  # MPICOMM_TIMEOUT for the cases that need one (seconds)
BOUND = 100  # wall-clock bound for any case, start-up on a loaded 2-core machine included


def inject(case, tmp_path, ranks=3, *args, **env):
    """Run one case; return (exit status, seconds, {rank: record}, combined output)."""
    environ = dict.fromkeys(("MPICOMM_TIMEOUT", "MPICOMM_VALIDATE", "MPICOMM_ABORT_ON_EXCEPTION"))
    environ.update({k: str(v) for k, v in env.items()})
    start = time.monotonic()
    proc = run_mpi(ranks, str(SCRIPT), case, str(tmp_path), *args, timeout=BOUND, env=environ)
    elapsed = time.monotonic() - start
    records = {}
    for path in tmp_path.glob("rank*.json"):
        record = json.loads(path.read_text())
        records[record["rank"]] = record
    output = proc.stdout + proc.stderr
    assert proc.returncode != 124, f"{case} hung until the outer timeout:\n{output[-3000:]}"
    return proc.returncode, elapsed, records, output


def assert_timed_out(record, operation, missing):
    assert record["error"] == "CollectiveTimeoutError", record
    message = record["message"]
    assert operation in message and "'faults'" in message and f"{TIMEOUT} s" in message, message
    assert record["missing"] == missing, record


def test_rank_never_enters_collective(tmp_path):
    rc, elapsed, records, out = inject("never_enters", tmp_path, 3, MPICOMM_TIMEOUT=TIMEOUT)
    assert rc != 0 and elapsed < BOUND, out[-2000:]
    assert sorted(records) == [0, 1, 2], out[-2000:]
    for rank in (0, 2):
        assert_timed_out(records[rank], "all_reduce", [1])
        assert "Group rank 1 had not entered it" in records[rank]["message"]


def test_rank_raises_before_collective_timeout_path(tmp_path):
    """With the abort hook switched off, the timeout alone still ends the job, naming the rank."""
    rc, elapsed, records, out = inject(
        "raise_before", tmp_path, 3, MPICOMM_TIMEOUT=TIMEOUT, MPICOMM_ABORT_ON_EXCEPTION=0
    )
    assert rc != 0 and elapsed < BOUND, out[-2000:]
    assert records[1]["error"] == "RuntimeError" and "injected" in records[1]["message"]
    for rank in (0, 2):
        assert_timed_out(records[rank], "all_reduce", [1])


def test_rank_raises_before_collective_abort_hook(tmp_path):
    """No timeout at all: the abort hook (installed by every MPICommunicator) ends the job as soon
    as the failing rank raises; the others, blocked in all_reduce, are torn down."""
    rc, elapsed, records, out = inject("raise_before_abort", tmp_path, 3)
    assert rc != 0 and elapsed < BOUND, out[-2000:]
    assert "[rank 1] RuntimeError: injected failure before all_reduce" in out, out[-2000:]
    assert not any(r.get("message") == "all_reduce returned" for r in records.values())


def test_mismatched_arguments_raise_on_every_rank(tmp_path):
    rc, elapsed, records, out = inject("mismatch", tmp_path, 3, MPICOMM_VALIDATE=1)
    assert rc != 0 and elapsed < BOUND, out[-2000:]
    assert sorted(records) == [0, 1, 2], out[-2000:]
    expected = {
        "shape": ("all_reduce", "rank 1: all_reduce(float32[4, 5])"),
        "dtype": ("all_gather", "rank 1: all_gather(float64[4], dim=0)"),
        "sizes": ("all_gatherv", "rank 1: all_gatherv(float32[*, 3], dim=0, sizes=[2, 2, 3])"),
        "dim": ("all_gather", "rank 1: all_gather(float32[2, 2], dim=0)"),
        "root": ("broadcast", "rank 1: broadcast(float32[4], root=1)"),
        "operation": (None, "rank 1: all_gather(float32[4], dim=0)"),
    }
    messages = {kind: set() for kind in expected}
    for rank, record in records.items():
        for kind, (operation, victim_call) in expected.items():
            case = record["cases"][kind]
            assert case["error"] == "ValueError", (rank, kind, case)
            assert case["recovered"] is True, (rank, kind, "communicator unusable afterwards")
            message = case["message"]
            assert f"the ranks disagree on {kind}" in message, message
            assert "'faults'" in message and victim_call in message, message
            assert all(f"rank {r}:" in message for r in range(3)), message
            if operation is not None:
                assert message.startswith(f"{operation} on group"), message
            messages[kind].add(message.split(": the ranks")[1])
    # the description of the disagreement is the same on every rank
    assert all(len(m) == 1 for m in messages.values()), messages


def test_receive_of_the_wrong_size(tmp_path):
    rc, elapsed, records, out = inject("recv_wrong_size", tmp_path, 2)
    assert rc != 0 and elapsed < BOUND, out[-2000:]
    record = records[1]
    assert record["error"] == "CommunicationError", record
    assert "recv on group 'faults'" in record["message"]
    assert "40 bytes" in record["message"] and "32 bytes" in record["message"]
    # the bad message was consumed whole: the next receive got the next message, intact
    assert record["recovered"] is True


def test_receive_that_never_arrives(tmp_path):
    rc, elapsed, records, out = inject("recv_nothing", tmp_path, 2, MPICOMM_TIMEOUT=TIMEOUT)
    assert rc != 0 and elapsed < BOUND, out[-2000:]
    assert_timed_out(records[1], "recv", [0])
    assert "Group rank 0 had sent nothing" in records[1]["message"]


def test_rank_killed_mid_job(tmp_path):
    """SIGKILL on one rank in a stream of collectives, no timeout: mpiexec ends the job."""
    rc, elapsed, records, out = inject("sigkill", tmp_path, 3)
    assert rc != 0 and elapsed < BOUND, out[-2000:]
    assert records[1]["error"] == "SIGKILL"
    assert "KILLED BY SIGNAL: 9" in out or "signal 9" in out.lower(), out[-2000:]


def test_mismatched_counts_without_validation_are_not_silent_success(tmp_path):
    """Without MPICOMM_VALIDATE a count mismatch is undefined in MPI. This documents what this MPI
    does (see docs/reliability.md): the job must end, and it must not look like a correct run."""
    rc, elapsed, records, out = inject("unvalidated", tmp_path, 2, "all_reduce")
    assert elapsed < BOUND
    correct = [2.0, 4.0, 6.0, 8.0]
    results = [r.get("result") for r in records.values()]
    assert rc != 0 or any(r != correct for r in results), (rc, results, out[-2000:])
