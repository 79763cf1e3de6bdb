"""The mpicomm torch backend's waits are bounded by the group's ``timeout=`` and name the absent
rank, and a group refuses every call after its timeout (tests/programs/dist_timeout.py at 3
ranks)."""

from __future__ import annotations

import json

from tests.helpers import PROGRAMS, run_mpi

SECONDS = 2.0  # the program's group timeout
SLACK = 3.0  # a loaded 2-core machine


def test_absent_rank_times_out_and_is_named(tmp_path):
    prefix = tmp_path / "timeout"
    proc = run_mpi(3, str(PROGRAMS / "dist_timeout.py"), str(prefix), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r: json.loads((tmp_path / f"timeout.rank{r}.json").read_text()) for r in range(3)}
    assert records[1] == {}
    for rank in (0, 2):
        error, missing, seconds = records[rank]["all_reduce"]
        assert error == "CollectiveTimeoutError" and missing == [1], records[rank]
        assert SECONDS <= seconds < SECONDS + SLACK, records[rank]
        error, missing, seconds = records[rank]["monitored_barrier"]
        assert error == "CollectiveTimeoutError", records[rank]
        # rank 0 collects the arrivals and names rank 1; rank 2 waits for rank 0's release
        assert missing == ([1] if rank == 0 else [0]), records[rank]
        assert seconds < SECONDS + SLACK, records[rank]
        for then in ("broadcast", "barrier", "all_gather", "isend"):
            error, says_unusable, seconds = records[rank][f"then {then}"]
            assert (error, says_unusable) == ("CommunicationError", True), (then, records[rank])
            assert seconds < 1.0, (then, records[rank])  # refused at once, not timed out again
