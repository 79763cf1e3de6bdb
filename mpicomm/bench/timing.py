"""Timing one case the way nccl-tests and the OSU benchmarks do, and the figures derived from it.

Each rank times every iteration of the loop on its own clock; nothing is exchanged inside the
timed loop. After it, one ``MPI_Allreduce(MAX)`` of the per-iteration times gives the slowest
rank's time of each iteration, and the reported time per call is the median of those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .._mpi import MPI


@dataclass(frozen=True)
class Schedule:
    """How many warm-up and timed iterations a message of ``nbytes`` gets."""

    max_iters: int = 100
    min_iters: int = 5
    iter_bytes: int = 256 << 20

    def iters(self, nbytes: int) -> int:
        """``iter_bytes / nbytes`` clamped to ``[min_iters, max_iters]``: fewer for large sizes."""
        return max(self.min_iters, min(self.max_iters, self.iter_bytes // max(nbytes, 1)))

    def warmup(self, nbytes: int) -> int:
        return max(2, self.iters(nbytes) // 5)


@dataclass
class Timing:
    """Result of one timed loop: per-iteration slowest-rank times (seconds); ok on every rank."""

    times: np.ndarray
    ok: bool | None
    error: str | None = None

    @property
    def median_us(self) -> float:
        return float(np.median(self.times) * 1e6)


def time_loop(run, check, comm: MPI.Comm, warmup: int, iters: int) -> Timing:
    """Warm up, barrier, time ``iters`` calls of ``run``, verify with ``check``, reduce.

    ``check`` (or ``None``) runs after the timed loop. An exception on this rank is recorded and
    reported as a failure of the case on every rank (through the same final reduction).
    """
    times = np.zeros(iters, dtype=np.float64)
    flags = np.zeros(2, dtype=np.int32)  # [error, check failed]
    error = None
    try:
        for _ in range(warmup):
            run()
        comm.Barrier()
        clock = time.perf_counter
        for i in range(iters):
            t0 = clock()
            run()
            times[i] = clock() - t0
        if check is not None and not check():
            flags[1] = 1
    except Exception as exc:  # noqa: BLE001 - any failure of the case is reported, not raised
        flags[0] = 1
        error = f"{type(exc).__name__}: {exc}"
    any_flags = np.empty_like(flags)
    _reduce_flags(comm, flags, any_flags, error)
    slowest = np.empty_like(times)
    comm.Allreduce(times, slowest, MPI.MAX)
    if any_flags[0]:
        error = error or "failed on another rank"
        return Timing(slowest, None, error)
    return Timing(slowest, None if check is None else not any_flags[1])


def _reduce_flags(comm: MPI.Comm, flags, out, error: str | None, grace: float = 20.0) -> None:
    """Max-reduce ``flags``. A rank that failed waits ``grace`` seconds for the others and then
    aborts the job: a failure on one rank only leaves the others inside a collective forever."""
    request = comm.Iallreduce(flags, out, MPI.MAX)
    if not flags[0]:
        request.Wait()
        return
    deadline = time.monotonic() + grace
    while not request.Test():
        if time.monotonic() > deadline:
            print(
                f"rank {comm.rank}: benchmark case failed on this rank only ({error}); "
                "the other ranks are stuck in the collective: aborting",
                flush=True,
            )
            comm.Abort(3)
        time.sleep(1e-3)


def bandwidths(nbytes: int, seconds: float, factor: float) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes/s), nccl-tests' definitions."""
    algbw = nbytes / seconds / 1e9 if seconds > 0 else float("nan")
    return algbw, algbw * factor


def figures(rec: dict, times: np.ndarray, factor: float) -> None:
    """Set a record's median, minimum and 90th-percentile time and its bandwidths."""
    med = float(np.median(times))
    rec["time_us"] = med * 1e6
    rec["time_us_min"] = float(times.min() * 1e6)
    rec["time_us_p90"] = float(np.percentile(times, 90) * 1e6)
    rec["algbw_GBps"], rec["busbw_GBps"] = bandwidths(rec["bytes"], med, factor)
