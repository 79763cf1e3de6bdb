"""Abort the whole MPI job when any rank has an uncaught exception.

:func:`install_abort_on_exception` (every :class:`~mpicomm.MPICommunicator` calls it) makes an
uncaught exception on any rank (main thread or any other thread) print its traceback tagged with
the rank and call ``MPI.COMM_WORLD.Abort(1)``, so the whole job ends with a non-zero status
instead of the other ranks waiting forever. ``MPICOMM_ABORT_ON_EXCEPTION=0`` disables it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback

__all__ = ["install_abort_on_exception", "running_world", "uninstall_abort_on_exception"]

_lock = threading.Lock()
_installed: dict[str, object] = {}  # "sys" / "threading" -> the hook we replaced


def _abort_enabled() -> bool:
    from .config import abort_on_exception

    return abort_on_exception()


def running_world():
    """(MPI module, world) when MPI is initialised and not finalised, else (None, None)."""
    mpi = sys.modules.get("mpi4py.MPI")  # never import (and so initialise) MPI from a hook
    if mpi is None:
        return None, None
    try:
        if not mpi.Is_initialized() or mpi.Is_finalized():
            return None, None
        return mpi, mpi.COMM_WORLD
    except Exception:
        return None, None


def _report_and_abort(exc_type, exc, tb, where: str) -> bool:
    """Print the tagged traceback and abort when there are other ranks; False if MPI is absent."""
    mpi, world = running_world()
    if world is None or world.Get_size() == 1:
        return False
    rank, size = world.Get_rank(), world.Get_size()
    tag = f"[rank {rank}] "
    lines = [
        f"mpicomm: uncaught {exc_type.__name__} in {where} on rank {rank} of {size} "
        f"(host {socket.gethostname()}, pid {os.getpid()}); aborting the MPI job.\n"
    ]
    lines += traceback.format_exception(exc_type, exc, tb)
    text = "".join(tag + line + "\n" for chunk in lines for line in chunk.rstrip("\n").split("\n"))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    _write_surely(text)
    return True


def _write_surely(text: str) -> None:
    """``text`` on ``sys.stderr`` and, when that is not the process's stderr, on file descriptor
    2 as well: an outer hook may have pointed ``sys.stderr`` at a buffer it prints only after
    this hook returns (torch.distributed's does, from ``init_process_group``), and this hook
    aborts instead of returning."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
        redirected = sys.stderr is not sys.__stderr__
    except Exception:
        redirected = True
    if redirected:
        with contextlib.suppress(OSError):
            os.write(2, text.encode(errors="replace"))


def _call_abort() -> None:
    mpi, world = running_world()
    if world is not None:
        # Give the launcher's output forwarding a moment: hydra can tear the job down before the
        # traceback just written reaches mpiexec's stderr (seen in CI as an empty job output).
        time.sleep(0.5)
        world.Abort(1)
    os._exit(1)  # Abort does not return; if it somehow did, still do not hang


def _sys_hook(exc_type, exc, tb):
    previous = _installed.get("sys") or sys.__excepthook__
    if not _abort_enabled() or not _report_and_abort(exc_type, exc, tb, "the main thread"):
        previous(exc_type, exc, tb)
        return
    if previous is not sys.__excepthook__:  # a user's hook: let it run too (ours printed already)
        with contextlib.suppress(Exception):
            previous(exc_type, exc, tb)
    _call_abort()


def _thread_hook(args):
    previous = _installed.get("threading") or threading.__excepthook__
    if (
        args.exc_type is SystemExit
        or not _abort_enabled()
        or not _report_and_abort(
            args.exc_type,
            args.exc_value,
            args.exc_traceback,
            f"thread {getattr(args.thread, 'name', '?')!r}",
        )
    ):
        previous(args)
        return
    if previous is not threading.__excepthook__:
        with contextlib.suppress(Exception):
            previous(args)
    _call_abort()


def install_abort_on_exception() -> bool:
    """Abort the whole MPI job when any rank has an uncaught exception. Idempotent.

    Replaces ``sys.excepthook`` and ``threading.excepthook`` with hooks that print the traceback
    with every line tagged ``[rank R]``, run the previous hook if it was a custom one, and call
    ``MPI.COMM_WORLD.Abort(1)``. Without this an uncaught exception on one rank leaves the others
    blocked in their next collective (and the dying rank in ``MPI_Finalize``) until the job is
    killed. Nothing happens in a one-rank job or when MPI was never initialised (the previous
    hook runs as usual), and ``SystemExit`` (``sys.exit``) is not an uncaught exception.

    Returns True when the hooks are installed, False when disabled by
    ``MPICOMM_ABORT_ON_EXCEPTION=0`` (also read when an exception arrives).
    """
    if not _abort_enabled():
        return False
    with _lock:
        if sys.excepthook is not _sys_hook:
            _installed["sys"] = sys.excepthook
            sys.excepthook = _sys_hook
        if threading.excepthook is not _thread_hook:
            _installed["threading"] = threading.excepthook
            threading.excepthook = _thread_hook
    return True


def uninstall_abort_on_exception() -> None:
    """Put back the hooks that :func:`install_abort_on_exception` replaced (if still ours)."""
    with _lock:
        if sys.excepthook is _sys_hook:
            sys.excepthook = _installed.get("sys") or sys.__excepthook__
        if threading.excepthook is _thread_hook:
            threading.excepthook = _installed.get("threading") or threading.__excepthook__
        _installed.clear()
