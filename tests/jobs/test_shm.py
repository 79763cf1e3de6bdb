"""mpicomm.shm under mpiexec: a rank that dies, is killed, stalls or is late while the others
wait in shared memory; a signal during a wait; a rank killed while a segment is built; a full
/dev/shm. Each test runs ``tests/programs/shm_fault.py MODE`` (in one process:
tests/unit/test_shm.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.helpers import PROGRAMS, run_mpi

pytest.importorskip("mpicomm.shm._core", reason="the compiled core is not built here")


def _fault(tmp_path: Path, mode: str, ranks: int, timeout: float):
    # MPICH's launcher ends the whole job when one process dies; keep the survivors running so
    # that they can report what they saw.
    config = tmp_path / "hydra.cfg"
    config.write_text("-disable-auto-cleanup\n")
    proc = run_mpi(
        ranks,
        str(PROGRAMS / "shm_fault.py"),
        mode,
        str(timeout),
        timeout=60,
        env={"HYDRA_CONFIG_FILE": str(config)},
    )
    out = proc.stdout
    prefix = re.search(r"SHM_PREFIX (\S+)", out).group(1)  # the job's id in it, if any
    assert "SHM_FILES 0" in out  # removed as soon as it was made
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]
    faults = re.findall(r"SHM_FAULT rank=(\d+) error=(\w+) missing=(\S+) seconds=([\d.]+)", out)
    assert "error=none" not in out
    return faults, out, proc


def test_dead_rank_ends_the_wait(tmp_path):
    """A peer that exits while the others wait in shared memory: they get a CommunicationError
    naming it within a fraction of a second, though the timeout (30 s) is far off."""
    faults, out, _ = _fault(tmp_path, "exit", 3, 30)
    assert faults, out
    for _rank, error, _, seconds in faults:
        assert error == "CommunicationError" and float(seconds) < 10, out
    assert "group rank(s) 2 died" in out


def test_killed_rank_ends_the_job(tmp_path):
    """SIGKILL: the launcher may end the survivors itself (it does not always wait for them to
    notice); the job ends well within the bound, and any survivor that reports names the dead
    rank. No name is left in /dev/shm either way."""
    faults, out, proc = _fault(tmp_path, "kill", 3, 30)
    assert proc.returncode not in (124, 137), out  # ended by itself, not by the outer timeout
    killed = re.search(r"(?i)signal:? 9\b", out + proc.stderr)  # hydra words it two ways
    assert faults or (killed and proc.returncode != 0), out + proc.stderr
    for _rank, error, _, seconds in faults:
        assert error == "CommunicationError" and float(seconds) < 10, out


def test_stalled_rank_times_out(tmp_path):
    """A peer that never arrives: CollectiveTimeoutError after the timeout, naming it."""
    faults, out, _ = _fault(tmp_path, "stall", 2, 1.5)
    assert faults, out
    for _rank, error, missing, seconds in faults:
        assert error == "CollectiveTimeoutError" and missing == "[1]", out
        assert 1.4 < float(seconds) < 10, out
    assert "Group rank 1 had not entered it" in out


@pytest.mark.parametrize("mode", ["interrupt", "interrupt-large", "term"])
def test_a_signal_ends_a_wait_and_breaks_the_communicator(mode):
    """Ctrl-C (SIGINT), or SIGTERM with a handler that raises SystemExit, reaches Python while a
    rank waits in shared memory for a peer that never comes, within a bound far below the
    timeout (30 s; the core checks every 10 ms, the bound leaves room for a loaded machine),
    small messages (GIL held) and large ones (GIL released) alike; the communicator then
    refuses further calls, as on the MPI path."""
    proc = run_mpi(2, str(PROGRAMS / "shm_fault.py"), mode, "30", timeout=90)
    found = re.search(
        r"SHM_SIGNAL error=(\w+) seconds=([-\d.]+) refused=(\S+) broken=(\w+)", proc.stdout
    )
    assert found, proc.stdout + proc.stderr
    error, seconds, refused, broken = found.groups()
    assert error == ("SystemExit" if mode == "term" else "KeyboardInterrupt"), proc.stdout
    assert 0 <= float(seconds) < 0.5, proc.stdout
    assert refused == "CommunicationError" and broken == "True", proc.stdout


def test_a_late_peer_is_waited_for_without_burning_the_cpu():
    """4 ranks on this 2-core machine, the last one 0.2 s late: the waiting ranks yield, then
    sleep between polls (docs/shm.md, "Waiting"), so each spends a small fraction of the wait on
    the CPU (a wait that only yields spends what the scheduler leaves it: most of a core on an
    idle machine)."""
    proc = run_mpi(4, str(PROGRAMS / "shm_fault.py"), "late", "30", timeout=90)
    waits = re.findall(r"SHM_LATE rank=(\d+) cpu=([\d.]+) wall=([\d.]+)", proc.stdout)
    assert len(waits) == 9, proc.stdout
    for _rank, cpu, wall in waits:
        assert float(wall) > 0.15, proc.stdout
        assert float(cpu) < 0.05 * float(wall), proc.stdout


@pytest.mark.parametrize("phase", ["created", "mapping", "mapped"])
def test_no_segment_survives_a_rank_killed_during_construction(phase):
    """SIGKILL at each step of building a group's segment (rank 0 right after making it; the
    last rank before mapping it, while rank 0 waits for it; the last rank right after): the
    launcher ends the job, and no name of rank 0's is left in /dev/shm (the name is removed as
    soon as the object exists)."""
    proc = run_mpi(3, str(PROGRAMS / "shm_fault.py"), f"die-{phase}", "30", timeout=90)
    prefix = re.search(r"SHM_PREFIX (\S+)", proc.stdout)
    assert prefix and proc.returncode != 0, proc.stdout + proc.stderr
    assert "SHM_FILES" not in proc.stdout  # no rank got past construction
    left = [f for f in os.listdir("/dev/shm") if f.startswith(prefix.group(1))]
    for f in left:  # do not leave them behind for the next run
        os.unlink(f"/dev/shm/{f}")
    assert not left


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_full_dev_shm_is_refused_at_construction(ranks):
    """/dev/shm with room for one segment (a private tmpfs of rank 0's, where it may mount one):
    the next groups fall back to MPI with one warning (shm="1" at 1 rank: refused), and the sums
    are right; before, the segment was only truncated, and the first write past the room was a
    SIGBUS."""
    proc = run_mpi(
        ranks,
        str(PROGRAMS / "shm_fault.py"),
        "full",
        "30",
        timeout=90,
        env={"MPICOMM_SHM_DIRECT": "0"},
    )
    if "SHM_FULL skipped" in proc.stdout:
        pytest.skip("no private /dev/shm can be mounted here (needs CAP_SYS_ADMIN)")
    seen = re.search(r"SHM_FULL (.*)", proc.stdout)
    assert seen, proc.stdout + proc.stderr
    want = "shm refused refused" if ranks == 1 else "shm mpi mpi"
    assert seen.group(1).strip().split("; ") == [want] * ranks, proc.stdout
    if ranks > 1:
        assert proc.stderr.count("no shared memory") == 1, proc.stderr
        assert "No space left on device" in proc.stderr, proc.stderr
