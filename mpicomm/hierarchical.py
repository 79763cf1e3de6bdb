"""The node-aware all_reduce, for groups whose ranks span several nodes.

Inside a node ranks share memory; between nodes every byte crosses the network. A flat all_reduce
treats all links alike; this one moves each node's data across the network once.

Where each node's ranks have a shared-memory segment (docs/shm.md) and every node holds as many
ranks (L), the sum is two-dimensional (docs/multinode.md, "Hierarchical all_reduce"): (1) a
shared-memory reduce_scatter inside each node leaves local rank i the node's sum of chunk i (1/L
of the vector); (2) local rank i of every node sums chunk i with local rank i of the other nodes
(:attr:`~mpicomm.topology.NodeSplit.peers`), all L ranks of a node on the network at once: with
two nodes one exchange of the chunk and a sum in node order, else a reduce-scatter and an
all-gather; (3) a shared-memory all-gather inside each node assembles the chunks.

Otherwise (no segment, a GPU tensor, nodes of unequal sizes) the leader algorithm runs: (1) reduce
inside each node to its leader (the node's lowest rank); (2) the leaders all-reduce across the
network as a reduce-scatter and an all-gather; (3) each leader broadcasts the result in its node.

Numerics (docs/contract.md): float16/bfloat16 are summed in float32 from the first step to the
last and rounded once, by the rank that finishes the element; every element is finished by
exactly one rank, or by the two ranks of a two-node exchange adding the same two float32 values in
the same order, and then copied, so all ranks hold identical bits. float32/float64 sum in their
own type under the same rule. Which calls take this path is decided in :mod:`mpicomm.plan`.
"""

from __future__ import annotations

import torch

from . import plan
from ._mpi import MPI
from .buffers import Workspace, mpi_spec, sync_device, vector_spec
from .calls import Caller
from .dtypes import DtypeInfo
from .reduction import split_evenly
from .shm import Transport
from .topology import NodeSplit


def all_reduce(
    call: Caller,
    operation: str,
    split: NodeSplit,
    x: torch.Tensor,
    out: torch.Tensor,
    info: DtypeInfo,
    workspace: Workspace,
    local: Transport | None = None,
) -> None:
    """``out`` = elementwise sum of every rank's ``x`` (contiguous, same shape and dtype on every
    rank); scratch memory comes from ``workspace``; ``local``: the shared-memory transport of this
    node's ranks (``split.local``), or ``None``. Every rank gets identical bits."""
    acc, n, device = info.accumulate, x.numel(), x.device
    if n == 0:
        return
    flat = x.reshape(-1)
    local = local if local is not None and device.type == "cpu" else None
    if plan.two_level(split, local is not None):
        _two_level(call, operation, split, flat, acc, out.view(-1), workspace, local)
        return
    if acc is x.dtype:
        send = flat
    else:
        send = workspace.tensor("widen", (n,), acc, device)
        send.copy_(flat)
        sync_device(device)
    _through_leaders(call, operation, split, send, out, workspace, local)


def _two_level(
    call: Caller,
    operation: str,
    split: NodeSplit,
    send: torch.Tensor,
    acc: torch.dtype,
    out: torch.Tensor,
    workspace: Workspace,
    local: Transport,
) -> None:
    """The two-dimensional sum (module docstring) of ``send`` (n elements) into ``out`` (n
    elements of send's dtype), summed in ``acc``, on host memory."""
    device = send.device
    counts = split_evenly(send.numel(), split.local_size)
    size = counts[split.local_rank]
    part = workspace.tensor("parts", (size,), acc, device)
    local.reduce_scatter(send, counts, (size,), operation, out=part)  # 16-bit: into float32
    done = workspace.tensor("done", (size,), out.dtype, device)
    nodes, node = split.num_nodes, split.node_index
    if nodes == 2 and plan.one_exchange(out.dtype, acc, send.numel() * send.element_size()):
        # one exchange of the whole chunk; both ranks add the same two values in node order
        theirs = workspace.tensor("tails", (size,), acc, device)
        other = 1 - node
        call(operation, split.peers, "Sendrecv", mpi_spec(part), other, 0, mpi_spec(theirs), other)
        first, second = (part, theirs) if node == 0 else (theirs, part)
        if out.dtype is acc:
            torch.add(first, second, out=done)
        else:  # summed in acc, then rounded once by the copy (see below)
            first.add_(second)
            done.copy_(first)
    elif nodes == 2:
        # 16-bit results: half the chunk goes out in acc, the finished half comes back rounded
        # (a quarter fewer bytes on the network than exchanging the whole chunk in acc)
        halves = split_evenly(size, 2)
        ours, theirs = part.split(halves)
        if node:
            ours, theirs = theirs, ours
        other, at = 1 - node, halves[0] if node else 0
        mine = done[at : at + halves[node]]
        got = workspace.tensor("tails", (halves[node],), acc, device)
        call(operation, split.peers, "Sendrecv", mpi_spec(theirs), other, 0, mpi_spec(got), other)
        first, second = (ours, got) if node == 0 else (got, ours)
        # summed in acc, then rounded by a copy: faster than a 16-bit out= (docs/multinode.md)
        first.add_(second)
        mine.copy_(first)  # the one rounding
        back = done[halves[0] :] if node == 0 else done[: halves[0]]
        call(operation, split.peers, "Sendrecv", mpi_spec(mine), other, 1, mpi_spec(back), other)
    else:
        pieces = split_evenly(size, nodes)
        mine = workspace.tensor("tails", (pieces[node],), acc, device)
        call(
            operation, split.peers, "Reduce_scatter",
            mpi_spec(part), mpi_spec(mine), pieces, MPI.SUM,
        )  # fmt: skip
        finished = workspace.tensor("finished", (pieces[node],), out.dtype, device)
        finished.copy_(mine)  # the one rounding for 16-bit floats
        call(operation, split.peers, "Allgatherv", mpi_spec(finished), vector_spec(done, pieces))
    local.gatherv(done, counts, out.itemsize, out.shape, -1, out=out)


def _through_leaders(
    call: Caller,
    operation: str,
    split: NodeSplit,
    send: torch.Tensor,
    out: torch.Tensor,
    workspace: Workspace,
    local: Transport | None,
) -> None:
    """The leader algorithm (module docstring) of ``send`` (n elements of the accumulation dtype)
    into ``out``; ``local``: this node's transport for host memory, or ``None``."""
    acc, n, device = send.dtype, send.numel(), send.device
    summed = None
    if local is not None:  # None too for a dtype the compiled sums do not cover
        summed = local.all_reduce(send, workspace.tensor("accumulate", (n,), acc, device))
    partial = send if summed is None else summed
    if summed is None and split.local_size > 1:
        partial = workspace.tensor("accumulate", (n,), acc, device) if split.is_leader else None
        recv = mpi_spec(partial) if partial is not None else None
        call(operation, split.local, "Reduce", mpi_spec(send), recv, MPI.SUM, 0)
    if split.is_leader:
        if split.num_nodes > 1:
            counts = split_evenly(n, split.num_nodes)
            mine = workspace.tensor("parts", (counts[split.node_index],), acc, device)
            call(
                operation, split.leaders, "Reduce_scatter",
                mpi_spec(partial), mpi_spec(mine), counts, MPI.SUM,
            )  # fmt: skip
            partial = workspace.tensor("tails", (n,), acc, device)
            call(
                operation, split.leaders, "Allgatherv", mpi_spec(mine), vector_spec(partial, counts)
            )
        out.view(-1).copy_(partial)  # the one rounding for 16-bit floats
        sync_device(device)
    if local is not None:
        local.broadcast(out, 0, out=out)
    elif split.local_size > 1:
        call(operation, split.local, "Bcast", mpi_spec(out), 0)
