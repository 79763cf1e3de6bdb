"""``monitored_barrier`` for the mpicomm process group, and its entry in ``torch.distributed``.

torch's ``dist.monitored_barrier`` refuses every backend but gloo by name before it reaches the
group. When the first mpicomm group is created, :func:`install_torch_monitored_barrier` wraps it:
calls on an mpicomm group run :func:`monitored_barrier` here, all others go to torch's function
unchanged.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch.distributed as dist

from ..calls import poll
from ..errors import CollectiveTimeoutError

MONITOR_TAG = 32767  # the smallest MPI_TAG_UB the standard allows; user p2p tags stay below it


def _wait_all(requests, deadline: float | None) -> list[int]:
    """Indexes of ``requests`` still incomplete at ``deadline`` (``[]`` when all completed)."""
    pending = dict(enumerate(requests))

    def settled() -> bool:
        for i in [i for i, r in pending.items() if r.Test()]:
            del pending[i]
        return not pending

    poll(settled, None if deadline is None else max(0.0, deadline - time.monotonic()))
    return sorted(pending)


def monitored_barrier(pg, seconds: float | None, wait_all_ranks: bool) -> None:
    """Rank 0 of ``pg`` hears from every rank, then releases them; see
    :meth:`MPIProcessGroup.monitored_barrier`."""
    comm, rank, size = pg.comm, pg.rank(), pg.size()
    deadline = None if seconds is None else time.monotonic() + seconds
    token = np.zeros(1, dtype=np.int8)
    boxes = [np.zeros(1, dtype=np.int8) for _ in range(size)]
    if rank == 0:
        peers = list(range(1, size))
        arrivals = [comm.Irecv(boxes[p], p, MONITOR_TAG) for p in peers]
        late = [peers[i] for i in _wait_all(arrivals, deadline)]
        if late:
            pg.keep_alive(arrivals, boxes)
            named = late if wait_all_ranks else late[:1]
            raise CollectiveTimeoutError(
                f"monitored_barrier on group {pg.label!r}: rank(s) {', '.join(map(str, named))} "
                f"did not arrive within {seconds:g} s",
                operation="monitored_barrier",
                group=pg.label,
                timeout=seconds,
                missing=named,
            )
        releases = [comm.Isend(token, p, MONITOR_TAG) for p in peers]
        _wait_all(releases, deadline)
        return
    sent = comm.Isend(token, 0, MONITOR_TAG)
    release = comm.Irecv(boxes[0], 0, MONITOR_TAG)
    if _wait_all([sent, release], deadline):
        pg.keep_alive([sent, release], [token, boxes])
        raise CollectiveTimeoutError(
            f"monitored_barrier on group {pg.label!r}: rank 0 did not release rank {rank} "
            f"within {seconds:g} s (a rank failed to arrive, see rank 0's error)",
            operation="monitored_barrier",
            group=pg.label,
            timeout=seconds,
            missing=[0],
        )


def install_torch_monitored_barrier(group_class: type) -> None:
    """Make ``dist.monitored_barrier`` serve groups of ``group_class`` (idempotent)."""
    original = dist.distributed_c10d.monitored_barrier
    if getattr(original, "serves_mpicomm", False):
        return

    @functools.wraps(original)
    def monitored(group=None, timeout=None, wait_all_ranks=False):
        pg = dist.group.WORLD if group is None else group
        if isinstance(pg, group_class):
            return pg.monitored_barrier(timeout, wait_all_ranks=wait_all_ranks)
        return original(group, timeout, wait_all_ranks)

    monitored.serves_mpicomm = True
    dist.distributed_c10d.monitored_barrier = monitored
    dist.monitored_barrier = monitored
