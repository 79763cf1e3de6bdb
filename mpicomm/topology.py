"""Where each rank runs: node-local rank and size, node index, and the default device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mpi4py import MPI


@dataclass(frozen=True)
class Topology:
    """This rank's place among the nodes of a communicator.

    ``local_rank``/``local_size``: position and count of the ranks sharing this node (a
    shared-memory split); ``node_index``: this node's index among the ``num_nodes`` nodes, ordered
    by their lowest rank; ``hostname``: ``MPI.Get_processor_name()``.
    """

    local_rank: int
    local_size: int
    node_index: int
    num_nodes: int
    hostname: str


def node_topology(comm: MPI.Comm | None = None) -> Topology:
    """The :class:`Topology` of this rank in ``comm`` (default ``COMM_WORLD``). Collective."""
    comm = MPI.COMM_WORLD if comm is None else comm
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
        leader = local.bcast(comm.Get_rank(), root=0)
    finally:
        local.Free()
    leaders = sorted(set(comm.allgather(leader)))
    return Topology(
        local_rank=local_rank,
        local_size=local_size,
        node_index=leaders.index(leader),
        num_nodes=len(leaders),
        hostname=MPI.Get_processor_name(),
    )


def default_device(local_rank: int) -> torch.device:
    """``cuda:<local_rank mod GPUs>`` where torch sees GPUs, else ``cpu``."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
