"""Work objects the mpicomm process group returns (``async_op=True`` handles, DDP's futures).

Collectives run to completion inside the call (they are MPI collectives bounded by the group's
timeout), so their work is already complete: ``wait()`` returns ``True`` at once and
``get_future()`` holds the result torch's own backends give (the list of output tensors).

Point-to-point operations must not block (``batch_isend_irecv`` on a Python group becomes one
``isend``/``irecv`` per operation, and a ring of blocking sends deadlocks): they start an MPI
``Isend``/``Irecv`` and return a :class:`PendingWork` that completes the request in ``wait()``,
bounded by the group's timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future

from .._mpi import MPI
from ..calls import poll, timed_out
from ..errors import CommunicationError


def completed(result) -> dist.Work:
    """A finished work whose future holds ``result``."""
    future = torch.futures.Future()
    future.set_result(result)
    return _create_work_from_future(future)


class PendingWork(dist.Work):
    """An MPI point-to-point request; ``wait()`` completes it (and copies a staged receive back).

    ``finish`` runs once when the request completes (``None`` for sends). ``peer`` is the group
    rank on the other side, named in a timeout. ``source`` gives the sender of a receive from any
    rank (torch asks ``_source_rank()``).
    """

    def __init__(
        self,
        request: MPI.Request,
        keep: tuple,
        finish: Callable[[MPI.Status], None] | None,
        *,
        operation: str,
        group: str,
        peer: int,
        timeout: float | None,
        result: list[torch.Tensor],
    ) -> None:
        super().__init__()
        self._request = request
        self._keep = keep  # the buffers MPI reads or writes stay alive as long as the request
        self._finish = finish
        self._operation = operation
        self._group = group
        self._peer = peer
        self._timeout = timeout
        self._status = MPI.Status()
        self._source = peer
        self._done = False
        self._future = torch.futures.Future()
        self._result = result

    def _complete(self) -> None:
        self._done = True
        if self._finish is not None:
            self._finish(self._status)
            self._source = self._status.Get_source()
        self._keep = ()
        self._future.set_result(self._result)

    def _test(self) -> bool:
        if self._done:
            return True
        try:
            if self._request.Test(self._status):
                self._complete()
        except MPI.Exception as exc:
            raise CommunicationError(
                f"{self._operation} on group {self._group!r} failed: {exc.Get_error_string()}",
                operation=self._operation,
                group=self._group,
            ) from exc
        return self._done

    def is_completed(self) -> bool:
        return self._test()

    def is_success(self) -> bool:
        return self._test()

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        """Complete the request; ``CollectiveTimeoutError`` after ``timeout`` (if given and
        nonzero) or the group's timeout."""
        seconds = timeout.total_seconds() if timeout else 0.0
        limit = seconds if seconds > 0 else self._timeout
        if poll(self._test, limit) is None:
            raise timed_out(
                self._operation,
                self._group,
                limit,
                f" Group rank {self._peer} did not take part.",
                [self._peer],
            )
        return True

    def get_future(self) -> torch.futures.Future:
        """The future of the result; completes the request first (nothing else would progress it)."""
        self.wait()
        return self._future

    def result(self) -> list[torch.Tensor]:
        return self._result

    def source_rank(self) -> int:
        return self._source

    def _source_rank(self) -> int:
        return self._source

    def exception(self):
        return None
