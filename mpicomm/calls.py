"""Running MPI calls for one group: MPI errors become :class:`CommunicationError`, waits are bounded.

Longer than ~400 lines on purpose: the one wait loop, the one timeout message and the one way to
make a communicator live here beside the Caller that uses them (docs/architecture.md).

Blocking and non-blocking variants share one body: without a timeout the blocking mpi4py method
runs (no extra cost); with one, its ``I``-prefixed twin starts the operation and the caller polls
it until it completes or the deadline passes.

Under a timeout each rank also tells its peers, with a tiny non-blocking message on a private
duplicate of the group, that it has entered collective number *k* (:class:`Arrivals`). When a wait
times out, the notices received so far say which ranks had not arrived.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from ._mpi import MPI
from .errors import CollectiveTimeoutError, CommunicationError
from .tracking import live_count

# Blocking calls that the MPICH wheel runs far slower than their non-blocking twin plus a wait
# (measured: docs/reliability.md, "How timeouts work").
_FASTER_NONBLOCKING = {"Allgatherv"}
# Methods that are not collectives: they neither send nor count arrival notices.
_POINT_TO_POINT = {"Send", "Recv", "Sendrecv", "Mprobe"}
# How long, after a timeout, to keep collecting notices that may still be in flight.
_GRACE = 0.05
# Waiting under a timeout: spin this long (seconds), then yield the core until _YIELD, then sleep.
_SPIN = 0.002
_YIELD = 0.1


_T = TypeVar("_T")


def nonblocking(method: str) -> str:
    """mpi4py's non-blocking twin of a blocking method: ``Allreduce`` -> ``Iallreduce``."""
    return "I" + method[0].lower() + method[1:]


def created(group: str, make: Callable[[], _T], what: str) -> _T:
    """``make()`` (an ``MPI_Comm_dup``, ``MPI_Comm_split`` or ``MPI_Comm_create_group``) with
    its failure as a :class:`CommunicationError` (:func:`creation_error`)."""
    try:
        return make()
    except MPI.Exception as exc:
        raise creation_error(group, what, exc) from exc


# MPICH's limit on communicators per process (context ids), docs/reliability.md.
COMMUNICATOR_LIMIT = 2048


def creation_error(group: str, what: str, exc: MPI.Exception) -> CommunicationError:
    """The error of a communicator MPI could not make, naming the cause. The usual one: MPI
    runs out of communicators (MPICH: 2048 per process, each MPICommunicator holding 2 to 4)
    when communicators are made and never destroyed."""
    lines = [line.strip() for line in exc.Get_error_string().splitlines() if line.strip()]
    error = lines[-1] if lines else str(exc)  # MPICH: the last line of its stack says why
    text = f"group {group!r}: MPI could not create {what} ({error})."
    if "too many communicators" in error.lower() or exc.Get_error_class() == MPI.ERR_OTHER:
        text += (
            f" MPI has a limited number of communicators per process (MPICH: "
            f"{COMMUNICATOR_LIMIT}); an MPICommunicator holds 2 to 4 of them (about 500 to 1,000 "
            f"MPICommunicators in all) and frees them in destroy(). This process holds "
            f"{live_count()} MPICommunicator(s) not destroyed: destroy the communicators you no "
            f"longer use"
        )
    return CommunicationError(text, operation="create", group=group)


def poll(test: Callable[[], _T], timeout: float | None) -> _T | None:
    """Call ``test`` until it returns something true, and return that; ``None`` once ``timeout``
    seconds have passed (``timeout=None``: wait as long as it takes). The one wait loop of the
    package: waits on MPI requests (collectives, receives, duplicates) all go through it.

    Non-blocking operations progress only while their ranks call ``Test``, so the wait starts like
    a blocking call (a tight loop for ``_SPIN`` s), then yields the core between tests
    (``sched_yield``) until ``_YIELD`` s, and only then sleeps, backing off to 1 ms. Exceptions
    (Ctrl-C, a signal handler's ``SystemExit``) propagate: the caller decides what the abandoned
    request means.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    pause = 0.0
    while True:
        result = test()
        if result:
            return result
        now = time.monotonic()
        if deadline is not None and now > deadline:
            return None
        if now - start < _SPIN:
            continue
        if now - start < _YIELD:
            os.sched_yield()
            continue
        pause = min(max(pause * 2, 2e-5), 1e-3)
        time.sleep(pause)


def timed_out(
    operation: str,
    group: str,
    seconds: float,
    detail: str = "",
    missing: list[int] | None = None,
) -> CollectiveTimeoutError:
    """The error of a wait that outlived its timeout (the one wording of it in the package).

    ``detail``: one or more sentences saying who had not arrived (e.g. ``" Group rank 1 had not
    entered it."``, with its leading space); ``missing``: those group ranks, when known.
    """
    return CollectiveTimeoutError(
        f"{operation} on group {group!r} did not complete within {seconds:g} s "
        f"(MPICOMM_TIMEOUT).{detail} A rank may have failed, be stuck, or never have called it. "
        f"End the job: leave this error uncaught (mpicomm's abort hook then calls MPI_Abort) or "
        f"call MPI.COMM_WORLD.Abort().",
        operation=operation,
        group=group,
        timeout=seconds,
        missing=missing,
    )


# Requests (with their buffers) abandoned by a wait outside any Caller (construction): MPI may
# still use them, so they are never freed.
_abandoned: list[tuple] = []


def wait_for(
    operation: str, group: str, request: MPI.Request, keepalive: tuple, timeout: float | None
) -> None:
    """Complete ``request`` (part of ``operation`` on ``group``) within ``timeout`` seconds.

    For the waits of construction, where no :class:`Caller` exists yet. At the timeout (or an
    exception while waiting) the request and ``keepalive`` are kept alive for good and
    :class:`CollectiveTimeoutError` is raised: some rank of the group never took part. An MPI
    error propagates as ``MPI.Exception`` (the caller knows what was being made).
    """
    try:
        done = poll(request.Test, timeout)
    except BaseException:
        _abandoned.append((request, keepalive))
        raise
    if not done:
        _abandoned.append((request, keepalive))
        raise timed_out(
            operation,
            group,
            timeout,
            " Some rank of the group had not reached it (a rank that failed before it, or "
            "never called it).",
        )


def duplicate(comm: MPI.Comm, group: str, what: str, timeout: float | None) -> MPI.Comm:
    """A duplicate of ``comm`` (collective, ``MPI_Comm_idup``) within ``timeout`` seconds: running
    out of communicators raises :class:`CommunicationError` (:func:`created`), a rank that never
    arrives :class:`CollectiveTimeoutError`."""
    dup, request = created(group, comm.Idup, what)
    try:
        wait_for("create", group, request, (dup,), timeout)
    except MPI.Exception as exc:  # a non-blocking creation reports its failure in the wait
        raise creation_error(group, what, exc) from exc
    return dup


class Arrivals:
    """Who has entered which collective of a group; used only under a timeout.

    ``comm`` is a private duplicate of the group: notices never meet user or payload traffic.
    On entering its *k*-th collective a rank sends the int64 *k* to every peer (eager, 8 bytes,
    non-blocking) and drains the notices that have reached it, so nothing accumulates. A rank
    whose last notice is below *k* had not entered collective *k*.
    """

    TAG = 1

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.seq = 0
        self.seen = [0] * self.size
        self.received = np.zeros(self.size, dtype=np.int64)
        self.sends: list[tuple[MPI.Request, np.ndarray]] = []
        self._box = np.empty(1, dtype=np.int64)
        self._status = MPI.Status()

    def enter(self) -> int:
        """Count one more collective, tell the peers, take in their notices; return its number."""
        self.seq += 1
        self.seen[self.rank] = self.seq
        note = np.array([self.seq], dtype=np.int64)
        for peer in range(self.size):
            if peer != self.rank:
                self.sends.append((self.comm.Isend(note, peer, self.TAG), note))
        self.drain()
        return self.seq

    def drain(self) -> None:
        """Receive every notice that has arrived; forget sends that have completed."""
        status = self._status
        while self.comm.Iprobe(MPI.ANY_SOURCE, self.TAG, status):
            source = status.Get_source()
            self.comm.Recv(self._box, source, self.TAG)
            self.received[source] += 1
            self.seen[source] = max(self.seen[source], int(self._box[0]))
        if self.sends and MPI.Request.Testall([r for r, _ in self.sends]):
            self.sends.clear()

    def missing(self, seq: int) -> list[int]:
        """Group ranks that have not (as far as the notices tell) entered collective ``seq``."""
        deadline = time.monotonic() + _GRACE
        while True:
            self.drain()
            late = [r for r in range(self.size) if self.seen[r] < seq]
            if not late or time.monotonic() > deadline:
                return late
            time.sleep(1e-3)

    def close(self, timeout: float) -> None:
        """Take in every notice still owed, then free the private communicator (collective).

        The ranks exchange how many notices each sent; each rank receives until it has them all,
        so no message is left behind on a freed communicator. If that does not finish within
        ``timeout`` the duplicate is left to MPI.
        """
        deadline = time.monotonic() + timeout
        mine = np.array([self.seq], dtype=np.int64)
        sent = np.empty(self.size, dtype=np.int64)
        request = self.comm.Iallgather(mine, sent)
        while not request.Test():
            if time.monotonic() > deadline:
                return
            time.sleep(1e-4)
        sent[self.rank] = self.received[self.rank] = 0
        while (self.received < sent).any() or self.sends:
            self.drain()
            if time.monotonic() > deadline:
                return
        self.comm.Free()


class Caller:
    """Calls mpi4py methods on behalf of a named group.

    ``timeout`` (seconds or ``None``) bounds every call. After a timeout, or any exception raised
    while polling (``KeyboardInterrupt``, a ``SystemExit`` from a signal handler), the pending
    request and its buffers are kept alive (MPI may still read or write them) and the caller is
    marked broken: every later call raises :class:`CommunicationError` rather than mixing with the
    stale operation. ``validating``: the owner checks arguments across ranks before each
    collective (consistency mode); it only changes the hint in a timeout's message.
    """

    def __init__(self, group: str, timeout: float | None = None) -> None:
        self.group = group
        self.timeout = timeout
        self.broken: str | None = None
        self._abandoned: list[tuple] = []
        self.arrivals: Arrivals | None = None
        self._last_missing: list[int] | None = None
        self.size: int | None = None  # the group's size, once prepare() has seen it
        self.validating = False

    @property
    def outstanding(self) -> int:
        """Requests this caller still holds: abandoned after a timeout, or notices in flight."""
        sends = len(self.arrivals.sends) if self.arrivals is not None else 0
        return len(self._abandoned) + sends

    def __call__(self, operation: str, comm: MPI.Comm, method: str, *args):
        """Run ``comm.<method>(*args)`` as part of ``operation``; return what it returns."""
        if self.broken is not None:
            raise CommunicationError(
                f"{operation} on group {self.group!r}: the communicator is unusable after "
                f"an earlier failure ({self.broken})",
                operation=operation,
                group=self.group,
            )
        try:
            if self.timeout is None:
                if method in _FASTER_NONBLOCKING:
                    return getattr(comm, nonblocking(method))(*args).Wait()
                return getattr(comm, method)(*args)
            who = self._who(operation, comm, method, args)
            start = getattr(comm, nonblocking(method))
            if method == "Mprobe":
                return self._poll(operation, lambda: start(*args), args, who)
            request = start(*args)
            self._poll(operation, request.Test, (request, args), who)
            return None
        except MPI.Exception as exc:
            raise CommunicationError(
                f"{operation} on group {self.group!r} failed in MPI_{method}: "
                f"{exc.Get_error_string()}",
                operation=operation,
                group=self.group,
            ) from exc

    def _who(self, operation: str, comm, method: str, args: tuple) -> Callable[[], str]:
        """A function naming, at a timeout, the ranks that had not arrived (and why we think so)."""
        if method == "Mprobe":
            return lambda: self._ranks_text(comm, [args[0]], "had sent nothing")
        if method == "Send":
            return lambda: self._ranks_text(comm, [args[1]], "had not received")
        if method in _POINT_TO_POINT or not isinstance(comm, MPI.Comm):
            return lambda: ""
        if self.size is not None and comm.Get_size() != self.size:
            # A sub-communicator (e.g. node-local in the hierarchical all_reduce): not every rank
            # of the group takes part, so it is not counted and its missing ranks are unknown.
            return lambda: ""
        if self.arrivals is None:
            self.arrivals = Arrivals(self._duplicate(operation, comm))
        seq = self.arrivals.enter()

        def missing() -> str:
            late = self.arrivals.missing(seq)
            self._last_missing = late
            if late:
                return self._ranks_text(comm, late, "had not entered it")
            if self.validating:
                return (
                    " Every rank had entered it, and the consistency mode is on (ranks that "
                    "disagree on a checked call's arguments raise ValueError): the ranks may be "
                    "in different calls of this group, or MPI is not progressing."
                )
            return (
                " Every rank had entered it: the ranks may be in different collectives or "
                "disagree on its arguments (MPICOMM_VALIDATE=1 checks that)."
            )

        return missing

    def prepare(self, comm: MPI.Comm) -> None:
        """Make the arrival-notice communicator now if a timeout is set (collective on ``comm``).

        Called when the communicator is built, so the first timed-out collective can already say
        who is missing. Without it, the first timed collective makes it (and cannot say).
        """
        self.size = comm.Get_size()
        if self.timeout is not None and self.arrivals is None:
            self.arrivals = Arrivals(self._duplicate("setup", comm))

    def _duplicate(self, operation: str, comm: MPI.Comm) -> MPI.Comm:
        """The private notice communicator: a duplicate of ``comm``, itself bounded by the timeout."""
        return duplicate(comm, self.group, "its arrival-notice communicator", self.timeout)

    def _ranks_text(self, comm, ranks: list[int], verb: str) -> str:
        self._last_missing = list(ranks)
        noun = "rank" if len(ranks) == 1 else "ranks"
        text = f" Group {noun} {', '.join(map(str, ranks))} {verb}"
        try:
            world = MPI.Group.Translate_ranks(comm.Get_group(), ranks, MPI.COMM_WORLD.Get_group())
            if list(world) != list(ranks):
                text += f" (global {', '.join(map(str, world))})"
        except MPI.Exception:  # pragma: no cover - a comm that cannot report its group
            pass
        return text + "."

    def _poll(
        self,
        operation: str,
        test: Callable[[], object],
        keepalive: tuple,
        who: Callable[[], str],
    ):
        """:func:`poll` ``test`` under this caller's timeout; raise at the deadline.

        After a timeout, or any exception raised while polling (Ctrl-C, a signal handler's
        ``SystemExit``, an MPI error), the request may still be live: ``keepalive`` (the request
        and its buffers) stays owned here and the caller refuses further calls.
        """
        try:
            result = poll(test, self.timeout)
        except BaseException as exc:
            self._abandoned.append(keepalive)
            self.broken = f"{operation} was interrupted by {type(exc).__name__} while waiting"
            raise
        if result is not None:
            return result
        self._abandoned.append(keepalive)
        self.broken = f"{operation} timed out after {self.timeout:g} s"
        self._last_missing = None
        detail = who()  # sets _last_missing where the ranks are known
        raise timed_out(operation, self.group, self.timeout, detail, self._last_missing)

    def probe(self, operation: str, comm: MPI.Comm, source: int, tag: int):
        """Matched probe (bounded like any call): ``(message, status)`` of the next message."""
        status = MPI.Status()
        message = self(operation, comm, "Mprobe", source, tag, status)
        return message, status

    def close(self) -> None:
        """Free what the timeout machinery made (collective: every rank of the group calls it)."""
        arrivals, self.arrivals = self.arrivals, None
        if arrivals is not None and self.broken is None:
            # If MPI fails here the group is failing anyway; the duplicate is left to MPI.
            with contextlib.suppress(MPI.Exception):
                arrivals.close(self.timeout or 10.0)
