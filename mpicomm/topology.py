"""Where ranks run: the one place that splits a communicator's ranks by node.

:func:`node_labels` is the node split (MPI's shared-memory split, or a caller's labels);
:class:`Topology` (one rank's view, for launchers and ``info``) and :class:`NodeSplit` (the node and
leader communicators of the hierarchical all_reduce) are both built from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._mpi import MPI


def node_labels(comm: MPI.Comm, node_of: Callable[[int], int] | None = None) -> tuple[int, ...]:
    """Collective over ``comm``: the node index of every rank, nodes numbered by their lowest rank.

    Nodes come from MPI's shared-memory split, or from ``node_of(rank) -> int`` when given (any
    labels; tests use it to pretend one host is several nodes).
    """
    rank = comm.Get_rank()
    if node_of is None:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        try:
            leader = local.bcast(rank, root=0)
        finally:
            local.Free()
        every = comm.allgather(leader)
    else:
        label = node_of(rank)
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ValueError(f"node_of({rank}) must be a non-negative int, got {label!r}")
        every = comm.allgather(label)
    first: dict[int, int] = {}
    for r, label in enumerate(every):
        first.setdefault(label, r)
    order = sorted(first.values())
    return tuple(order.index(first[label]) for label in every)


@dataclass(frozen=True)
class Topology:
    """This rank's place among the nodes of a communicator.

    ``local_rank``/``local_size``: position and count of the ranks sharing this node;
    ``node_index``: this node's index among the ``num_nodes`` nodes, ordered by their lowest rank;
    ``hostname``: ``MPI.Get_processor_name()``.
    """

    local_rank: int
    local_size: int
    node_index: int
    num_nodes: int
    hostname: str

    @classmethod
    def from_labels(cls, labels: tuple[int, ...], rank: int) -> Topology:
        node = labels[rank]
        return cls(
            local_rank=labels[:rank].count(node),
            local_size=labels.count(node),
            node_index=node,
            num_nodes=max(labels) + 1,
            hostname=MPI.Get_processor_name(),
        )


def node_topology(comm: MPI.Comm | None = None) -> Topology:
    """The :class:`Topology` of this rank in ``comm`` (default ``COMM_WORLD``). Collective."""
    comm = MPI.COMM_WORLD if comm is None else comm
    return Topology.from_labels(node_labels(comm), comm.Get_rank())


def default_device(local_rank: int | None = None) -> torch.device:
    """The device a rank uses when none is named (the one home of this rule): ``cpu`` where torch
    sees no GPU; else ``cuda:<local_rank mod GPUs>``, or, with ``local_rank=None``, torch's
    current CUDA device (what ``torch.cuda.set_device`` chose, as torch.distributed assumes)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return torch.device("cpu")
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass
class NodeSplit:
    """The ranks of ``comm`` by node, with the communicators a node-aware collective needs.

    ``local``: this node's ranks, in group order (local rank 0 is the node's lowest rank, its
    leader). ``leaders``: one rank per node in node order, ``MPI.COMM_NULL`` on non-leaders.
    ``peers``: the ranks of every node with this rank's local rank, in node order (rank k there
    is on node k; one per node when every node holds as many ranks: see :attr:`uniform`).
    ``node_of[r]``: node index of group rank ``r``.
    """

    comm: MPI.Comm
    local: MPI.Comm
    leaders: MPI.Comm
    peers: MPI.Comm
    node_of: tuple[int, ...]

    @classmethod
    def create(cls, comm: MPI.Comm, node_of: tuple[int, ...]) -> NodeSplit:
        """Collective over ``comm``: the node, leader and peer communicators for ``node_of``
        (from :func:`node_labels`)."""
        rank = comm.Get_rank()
        local = comm.Split(node_of[rank], rank)
        leaders = comm.Split(0 if local.Get_rank() == 0 else MPI.UNDEFINED, rank)
        peers = comm.Split(local.Get_rank(), node_of[rank])
        return cls(comm, local, leaders, peers, tuple(node_of))

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def local_rank(self) -> int:
        return self.local.Get_rank()

    @property
    def local_size(self) -> int:
        return self.local.Get_size()

    @property
    def node_index(self) -> int:
        return self.node_of[self.rank]

    @property
    def num_nodes(self) -> int:
        return max(self.node_of) + 1

    @property
    def smallest_node(self) -> int:
        """Ranks on the node with the fewest."""
        return min(self.node_of.count(k) for k in range(self.num_nodes))

    @property
    def uniform(self) -> bool:
        """Whether every node holds as many ranks as the others."""
        return self.smallest_node * self.num_nodes == len(self.node_of)

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0

    def free(self) -> None:
        """Free the node, leader and peer communicators (collective over ``comm``)."""
        for c in (self.peers, self.leaders, self.local):
            if c != MPI.COMM_NULL:
                c.Free()
        self.peers = self.leaders = self.local = MPI.COMM_NULL
