"""The engines that move a group's data (docs/architecture.md, "Engines"): one per group, its kind
chosen once at construction by :func:`mpicomm.plan.engine_for`.

``mpi`` (:class:`MPIEngine`): everything over MPI, for tensors on any device. ``shm``
(:class:`ShmEngine`): a group on one node with a shared-memory segment; host tensors go through it.
``hierarchical`` (:class:`HierarchicalEngine`): a group spanning nodes; its sums are node-aware.
"""

from __future__ import annotations

from .. import plan
from .._mpi import MPI
from ..calls import created
from ..errors import CommunicationError
from ..shm import open_transport
from ..topology import NodeSplit
from .hierarchical import HierarchicalEngine
from .mpi import MPIEngine, Parts
from .shm import ShmEngine

__all__ = ["HierarchicalEngine", "MPIEngine", "Parts", "ShmEngine", "open_engine"]


def open_engine(
    kind: str,
    parts: Parts,
    algo: str,
    mode: str,
    *,
    control: MPI.Comm,
    node_of: tuple[int, ...],
    shm: str,
    built: bool,
    direct: bool,
) -> MPIEngine:
    """The engine of ``kind`` (:func:`mpicomm.plan.engine_for`), collective on the group.

    ``control``: the group's control communicator (a group segment is set up on it); ``node_of``:
    each rank's node index; ``shm``: the ``shm`` setting (``1`` raises where no segment could be
    made; ``0`` gives the node-local steps none); ``built``: the compiled core is importable;
    ``direct``: ``MPICOMM_SHM_DIRECT``.
    """
    call = parts.call
    if kind == plan.SHM:
        transport = open_transport(control, call, parts.results, direct)
        if transport is not None:
            return ShmEngine(parts, algo, mode, transport)
        if shm == "1":
            raise CommunicationError(f"{call.group}: MPICOMM_SHM=1, but no segment could be made")
        return MPIEngine(parts, algo, mode)
    if kind == plan.HIERARCHICAL:
        # made here, where every rank is in a collective: a data call never runs an untimed one
        nodes = created(call.group, lambda: NodeSplit.create(parts.comm, node_of), "node groups")
        local = None
        if plan.node_shm_wanted(shm, built, nodes.local_size, parts.staging):
            local = open_transport(nodes.local, call, parts.results, direct)
        return HierarchicalEngine(parts, algo, mode, nodes, local)
    return MPIEngine(parts, algo, mode)
