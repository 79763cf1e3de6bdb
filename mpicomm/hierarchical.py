"""Hierarchical collectives for groups whose ranks span several nodes.

Inside a node ranks share memory; between nodes every byte crosses the network. A flat collective
treats all links alike; these move each node's data across the network once:

``all_reduce``
    (1) reduce inside each node to its leader (the node's lowest rank) over shared memory;
    (2) the leaders, one per node, all-reduce across the network as a reduce-scatter (each leader
    sums one chunk) followed by an all-gather; (3) each leader broadcasts the result in its node.
``all_gather``
    gather inside the node to the leader, all-gather node blocks among the leaders, broadcast.
``reduce_scatter``
    reduce inside the node to the leader, reduce-scatter node blocks among the leaders, scatter
    inside the node.

Numerics (CONTRACT section 3): float16/bfloat16 are summed in float32 from the first step to the
last and rounded once, on the leader that owns the chunk; every element is finished by exactly one
rank and then copied, so all ranks hold identical bits. float32/float64 sum in their own type under
the same rule. Only these four dtypes are handled here (:data:`ACCUMULATE`); the flat algorithms
cover the rest.

Every function takes contiguous host (or CUDA-aware device) tensors, never modifies them, and
returns fresh ones. ``call(operation, comm, method, *args)`` runs each MPI call (the communicator
passes its :class:`mpicomm.calls.Caller` so errors and timeouts are reported as everywhere else).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from mpi4py import MPI

from .buffers import mpi_spec, sync_device, vector_spec
from .reduction import split_evenly

# The dtype each handled dtype is summed in.
ACCUMULATE: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}

# ``auto`` uses the hierarchical all_reduce for AUTO_DTYPES when the group spans nodes, every node
# holds at least AUTO_MIN_PER_NODE ranks and the message has at least ALLREDUCE_FROM bytes. Their
# flat path (the bytes algorithm) is not node-aware: measured on 2 simulated hosts x 4 ranks it put
# 1.44x the hierarchy's bytes on the network; at 2 ranks per host the hierarchy moved more (its
# leaders send float32) and was not faster. float32/float64 go to MPI's own Allreduce, which moved
# the same bytes as the hierarchy at 2 and 4 ranks per host: never automatic. docs/multinode.md.
AUTO_DTYPES = (torch.float16, torch.bfloat16)
AUTO_MIN_PER_NODE = 4
ALLREDUCE_FROM = 64 << 10

MODES = ("auto", "0", "1")


def mode() -> str:
    """``MPICOMM_HIERARCHICAL``: ``auto`` (default), ``0`` (never) or ``1`` (whenever it applies)."""
    raw = os.environ.get("MPICOMM_HIERARCHICAL", "").strip().lower() or "auto"
    if raw not in MODES:
        raise ValueError(f"MPICOMM_HIERARCHICAL must be one of {', '.join(MODES)}, got {raw!r}")
    return raw


def _direct(operation: str, comm: MPI.Comm, method: str, *args):
    return getattr(comm, method)(*args)


@dataclass
class NodeSplit:
    """How the ranks of ``comm`` sit on nodes.

    ``local``: this node's ranks, in group order (local rank 0 is the node's lowest rank, its
    leader). ``leaders``: one rank per node in node order, ``MPI.COMM_NULL`` on non-leaders.
    ``node_of[r]``: node index of group rank ``r``; nodes are numbered by their lowest rank.
    """

    comm: MPI.Comm
    local: MPI.Comm
    leaders: MPI.Comm
    node_of: tuple[int, ...]

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
    def is_leader(self) -> bool:
        return self.local_rank == 0

    def members(self, node: int) -> list[int]:
        """Group ranks on ``node``, ascending."""
        return [r for r, n in enumerate(self.node_of) if n == node]

    @property
    def node_major(self) -> list[int]:
        """Group ranks ordered node by node (the order data sits in after the leaders' step)."""
        return [r for n in range(self.num_nodes) for r in self.members(n)]

    def worthwhile(self, dtype: torch.dtype, nbytes: int, how: str = "auto") -> bool:
        """Whether :func:`all_reduce` should replace the flat one for ``nbytes`` of ``dtype``."""
        if dtype not in ACCUMULATE or self.num_nodes < 2 or how == "0":
            return False
        if how == "1":
            return True
        smallest = min(self.node_of.count(k) for k in range(self.num_nodes))
        return dtype in AUTO_DTYPES and smallest >= AUTO_MIN_PER_NODE and nbytes >= ALLREDUCE_FROM

    def free(self) -> None:
        """Free the node and leader communicators (collective over ``comm``)."""
        for c in (self.leaders, self.local):
            if c != MPI.COMM_NULL:
                c.Free()
        self.leaders = self.local = MPI.COMM_NULL


def split_nodes(comm: MPI.Comm, node_of: Callable[[int], int] | None = None) -> NodeSplit:
    """Collective over ``comm``: the :class:`NodeSplit` of its ranks.

    Nodes come from MPI's shared-memory split, or from ``node_of(rank) -> int`` when given (any
    labels; tests use it to pretend one host is several nodes).
    """
    rank = comm.Get_rank()
    if node_of is None:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    else:
        label = node_of(rank)
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ValueError(f"node_of({rank}) must be a non-negative int, got {label!r}")
        local = comm.Split(label, rank)
    leader = local.bcast(rank, root=0)
    leader_of = comm.allgather(leader)
    order = sorted(set(leader_of))
    leaders = comm.Split(0 if local.Get_rank() == 0 else MPI.UNDEFINED, rank)
    return NodeSplit(comm, local, leaders, tuple(order.index(x) for x in leader_of))


def _check(x: torch.Tensor) -> torch.dtype:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input_ must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in ACCUMULATE:
        raise TypeError(
            f"input_: hierarchical collectives handle {list(ACCUMULATE)}, not {x.dtype}"
        )
    return ACCUMULATE[x.dtype]


def _reduce_to_leader(call, op: str, s: NodeSplit, x: torch.Tensor, acc: torch.dtype):
    """Node sum of ``x`` (flat) in ``acc`` on the leader (a fresh tensor); ``None`` elsewhere."""
    send = x.reshape(-1).to(acc)  # a copy for 16-bit inputs; never written to
    sync_device(send.device)
    if s.local_size == 1:
        return send.clone() if send.data_ptr() == x.data_ptr() else send
    out = torch.empty_like(send) if s.is_leader else None
    recv = mpi_spec(out) if out is not None else None
    call(op, s.local, "Reduce", mpi_spec(send), recv, MPI.SUM, 0)
    return out


def all_reduce(
    x: torch.Tensor, split: NodeSplit, call=_direct, operation: str = "all_reduce"
) -> torch.Tensor:
    """Elementwise sum of every rank's ``x`` (same shape and dtype on all ranks); every rank gets
    identical bits, shape and dtype as ``x``. See the module docstring for the algorithm."""
    acc = _check(x)
    n = x.numel()
    partial = _reduce_to_leader(call, operation, split, x, acc)
    if split.is_leader:
        if split.num_nodes > 1:
            counts = split_evenly(n, split.num_nodes)
            mine = torch.empty(counts[split.node_index], dtype=acc, device=x.device)
            call(
                operation, split.leaders, "Reduce_scatter",
                mpi_spec(partial), mpi_spec(mine), counts, MPI.SUM,
            )  # fmt: skip
            partial = torch.empty(n, dtype=acc, device=x.device)
            call(
                operation, split.leaders, "Allgatherv", mpi_spec(mine), vector_spec(partial, counts)
            )
        result = partial.to(x.dtype)  # the one rounding for 16-bit floats
        sync_device(result.device)
    else:
        result = torch.empty(n, dtype=x.dtype, device=x.device)
    if split.local_size > 1:
        call(operation, split.local, "Bcast", mpi_spec(result), 0)
    return result.view(x.shape)


def all_gather(
    x: torch.Tensor, split: NodeSplit, call=_direct, operation: str = "all_gather"
) -> torch.Tensor:
    """Every rank's ``x`` stacked in group order: shape ``(W, *x.shape)`` on every rank.

    Any dtype: only bytes move.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input_ must be a torch.Tensor, got {type(x).__name__}")
    src = x.contiguous()
    n, world = src.numel(), len(split.node_of)
    out = torch.empty((world, *src.shape), dtype=src.dtype, device=src.device)
    sync_device(src.device)
    flat = out.view(world, n)
    if split.is_leader:
        mine = flat[: split.local_size]  # node block, local order, staged at the front
        if split.local_size > 1:
            call(operation, split.local, "Gather", mpi_spec(src), mpi_spec(mine, n), 0)
        else:
            mine.copy_(src.view(1, n))
            sync_device(mine.device)
        if split.num_nodes > 1:
            sizes = [len(split.members(k)) * n for k in range(split.num_nodes)]
            staged = torch.empty_like(flat)
            call(
                operation, split.leaders, "Allgatherv",
                mpi_spec(mine), vector_spec(staged, sizes),
            )  # fmt: skip
            order = split.node_major
            if order == list(range(world)):
                flat.copy_(staged)
            else:
                flat[torch.tensor(order, device=flat.device)] = staged
                sync_device(flat.device)
    elif split.local_size > 1:
        call(operation, split.local, "Gather", mpi_spec(src), None, 0)
    if split.local_size > 1:
        call(operation, split.local, "Bcast", mpi_spec(out), 0)
    return out


def reduce_scatter(
    x: torch.Tensor,
    counts: list[int],
    split: NodeSplit,
    call=_direct,
    operation: str = "reduce_scatter",
) -> torch.Tensor:
    """Rank r gets the sum over ranks of elements ``[sum(counts[:r]), +counts[r])`` of flattened
    ``x``: a fresh 1-d tensor of ``counts[r]`` elements of ``x``'s dtype. Each element is summed
    (and rounded) once, on the leader of the node it is delivered to."""
    acc = _check(x)
    world = len(split.node_of)
    if len(counts) != world or sum(counts) != x.numel() or min(counts, default=0) < 0:
        raise ValueError(f"counts must be {world} non-negative sizes adding up to {x.numel()}")
    starts = [sum(counts[:r]) for r in range(world)]
    order = split.node_major
    flat = x.reshape(-1)
    if order != list(range(world)):  # lay each node's chunks out contiguously, node by node
        flat = torch.cat([flat[starts[r] : starts[r] + counts[r]] for r in order])
    partial = _reduce_to_leader(call, operation, split, flat, acc)
    members = split.members(split.node_index)
    node_counts = [counts[r] for r in members]
    if split.is_leader:
        block = partial
        if split.num_nodes > 1:
            per_node = [sum(counts[r] for r in split.members(k)) for k in range(split.num_nodes)]
            block = torch.empty(per_node[split.node_index], dtype=acc, device=x.device)
            call(
                operation, split.leaders, "Reduce_scatter",
                mpi_spec(partial), mpi_spec(block), per_node, MPI.SUM,
            )  # fmt: skip
        block = block.to(x.dtype)  # the one rounding for 16-bit floats
        sync_device(block.device)
    out = torch.empty(counts[split.rank], dtype=x.dtype, device=x.device)
    if split.local_size > 1:
        send = vector_spec(block, node_counts) if split.is_leader else None
        call(operation, split.local, "Scatterv", send, mpi_spec(out), 0)
    else:
        out.copy_(block)
    return out
