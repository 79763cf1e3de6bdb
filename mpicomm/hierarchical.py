"""The node-aware all_reduce, for groups whose ranks span several nodes.

Inside a node ranks share memory; between nodes every byte crosses the network. A flat all_reduce
treats all links alike; this one moves each node's data across the network once:

(1) reduce inside each node to its leader (the node's lowest rank); (2) the leaders, one per node,
all-reduce across the network as a reduce-scatter (each leader sums one chunk) followed by an
all-gather; (3) each leader broadcasts the result in its node. Steps (1) and (3) run in the node's
shared-memory segment for host memory where the communicator mapped one (docs/shm.md): step (1)
is then a shared-memory all_reduce of the node's ranks, in their order.

Numerics (docs/contract.md): float16/bfloat16 are summed in float32 from the first step to the
last and rounded once, on the leader that owns the chunk; every element is finished by exactly one
rank and then copied, so all ranks hold identical bits. float32/float64 sum in their own type under
the same rule. Which calls take this path is decided in :mod:`mpicomm.plan`.
"""

from __future__ import annotations

import torch

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
    flat = x.reshape(-1)
    if acc is x.dtype:
        send = flat
    else:
        send = workspace.tensor("widen", (n,), acc, device)
        send.copy_(flat)
        sync_device(device)
    local = local if local is not None and device.type == "cpu" else None
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
