"""Communicators not destroyed yet: named at exit, counted when MPI runs out of communicators.

:func:`track` / :func:`untrack`: communicators of more than one rank that were never destroyed are
named on stderr when the process exits (a rank leaving early, e.g. ``sys.exit(0)``, leaves its
peers waiting in their next collective on that group).
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading

from .aborts import running_world
from .launch import env_ranks

__all__ = ["live_count", "track", "untrack", "warn_undestroyed"]

_live: dict[int, tuple[str, int]] = {}  # id(communicator) -> (name, group size), until destroyed
_at_exit: list[bool] = []  # [True] once warn_undestroyed is registered with atexit
_NAMES_SHOWN = 8  # the exit warning names this many communicators, then counts the rest
_lock = threading.Lock()


def track(comm, name: str) -> None:
    """Remember ``comm`` (an object with ``world_size``) until :func:`untrack`; at exit, any
    still remembered with more than one rank is named on stderr."""
    with _lock:
        if not _at_exit:
            atexit.register(warn_undestroyed)
            _at_exit.append(True)
        _live[id(comm)] = (name, comm.world_size)


def live_count() -> int:
    """How many tracked communicators are not destroyed yet."""
    with _lock:
        return len(_live)


def untrack(comm) -> None:
    """Forget ``comm`` (it was destroyed)."""
    with _lock:
        _live.pop(id(comm), None)


def warn_undestroyed() -> list[str]:
    """Name on stderr the multi-rank communicators never destroyed (run at exit); returns them."""
    with _lock:
        names = [name for name, size in _live.values() if size > 1]
    if names:
        _, world = running_world()
        rank = world.Get_rank() if world is not None else env_ranks().rank
        shown = ", ".join(names[:_NAMES_SHOWN])
        if len(names) > _NAMES_SHOWN:
            shown += f" and {len(names) - _NAMES_SHOWN} more"
        with contextlib.suppress(Exception):
            sys.stderr.write(
                f"[rank {rank}] mpicomm: exiting with communicator(s) {shown} never "
                f"destroyed. If the other ranks are still in a collective on them they wait until "
                f"their MPICOMM_TIMEOUT, or forever without one: call destroy() on every rank "
                f"before leaving, or MPI.COMM_WORLD.Abort() to end the job.\n"
            )
            sys.stderr.flush()
    return names
