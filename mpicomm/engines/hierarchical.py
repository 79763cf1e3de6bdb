"""The hierarchical engine: a group whose ranks span nodes (docs/multinode.md).

The MPI engine, whose sums take the node-aware all_reduce of :mod:`mpicomm.hierarchical` where
:func:`mpicomm.plan.all_reduce_algorithm` chooses it; its node-local steps run in this node's
shared-memory segment where the node has one (:func:`mpicomm.plan.node_shm_wanted`).
"""

from __future__ import annotations

import copy

import torch

from .. import hierarchical, plan
from ..dtypes import DtypeInfo
from ..shm import Transport
from ..staging import Route
from ..topology import NodeSplit
from .mpi import MPIEngine, Parts


class HierarchicalEngine(MPIEngine):
    """:class:`~mpicomm.engines.mpi.MPIEngine` with the node communicators of ``nodes`` and,
    where this node has a segment, its transport ``node_transport``."""

    kind = plan.HIERARCHICAL

    def __init__(
        self,
        parts: Parts,
        algo: str,
        mode: str,
        nodes: NodeSplit,
        node_transport: Transport | None,
    ) -> None:
        super().__init__(parts, algo, mode)
        self.nodes = nodes
        self.node_transport = node_transport

    def plain(self) -> MPIEngine:
        engine = copy.copy(self)
        engine.node_transport = None
        return engine

    def close(self) -> None:
        if self.node_transport is not None:
            self.node_transport.close()
        self.nodes.free()

    def timeout_changed(self) -> None:
        if self.node_transport is not None:
            self.node_transport.timeout = self.call.timeout

    def _plan(self, info: DtypeInfo, nbytes: int, route: Route) -> str:
        host = route.staged or route.device.type == "cpu"
        node_memory = self.node_transport is not None and host
        return plan.all_reduce_algorithm(
            info, nbytes, self.algo, self.mode, self.nodes, node_memory
        )

    def _sum(self, algo: str, x: torch.Tensor, out: torch.Tensor, info: DtypeInfo) -> None:
        if algo != plan.HIERARCHICAL:
            super()._sum(algo, x, out, info)
            return
        hierarchical.all_reduce(
            self.call,
            "all_reduce",
            self.nodes,
            x,
            out,
            info,
            self.workspace,
            self.node_transport,
        )
