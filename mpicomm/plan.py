"""How one sum runs: the one place that chooses an all_reduce's (and reduce_scatter's) algorithm.

``native``
    MPI's own ``Allreduce`` / ``Reduce_scatter``, where MPI sums the dtype exactly as promised
    (integers, bool as logical or, float32/float64, complex) and is the faster choice.
``bytes``
    :func:`mpicomm.reduction.all_reduce_bytes`: raw bytes through MPI, the sum by torch in rank
    order in the accumulation dtype (the only algorithm for 16-bit and 8-bit floats).
``hierarchical``
    :func:`mpicomm.hierarchical.all_reduce`: for groups that span nodes (float types only).

Every rank decides alike from the dtype, the size, the communicator's settings and its node split,
so no agreement message is needed.
"""

from __future__ import annotations

import torch

from .dtypes import DtypeInfo
from .topology import NodeSplit

NATIVE, BYTES, HIERARCHICAL = "native", "bytes", "hierarchical"

# Message size (bytes) from which the bytes algorithm replaces MPI's Allreduce for dtypes MPI can
# sum. Measured with `python -m mpicomm bench --crossover` (2 ranks, MPICH wheel): bytes won at
# 64 MiB (1.25-1.47x) and tied or lost from 256 KiB to 16 MiB; see docs/benchmarks.md.
BYTES_ALLREDUCE_FROM = 64 << 20

# Dtypes whose elementwise add torch does not implement on every device: MPI only.
_TORCH_CANNOT_ADD = {torch.uint16, torch.uint32, torch.uint64}

# The hierarchical all_reduce handles these; ``auto`` uses it for AUTO_DTYPES when the group spans
# nodes, every node holds at least AUTO_MIN_PER_NODE ranks and the message has at least
# HIERARCHICAL_FROM bytes. The flat bytes algorithm is not node-aware: measured on 2 simulated
# hosts x 4 ranks it put 1.44x the hierarchy's bytes on the network; at 2 ranks per host the
# hierarchy moved more (its leaders send float32) and was not faster. float32/float64 go to MPI's
# own Allreduce, which moved the same bytes as the hierarchy: never automatic. docs/multinode.md.
HIERARCHICAL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
AUTO_DTYPES = frozenset({torch.float16, torch.bfloat16})
AUTO_MIN_PER_NODE = 4
HIERARCHICAL_FROM = 64 << 10


def flat_algorithm(info: DtypeInfo, nbytes: int, algo: str) -> str:
    """``native`` or ``bytes`` for a sum of ``nbytes`` of ``info``'s dtype under ``algo``
    (``auto``, ``native`` or ``bytes``: the communicator's ``allreduce_algo``)."""
    if info.sum_op is None:
        return BYTES
    if info.dtype in _TORCH_CANNOT_ADD:
        return NATIVE
    if algo == "auto":
        return BYTES if nbytes >= BYTES_ALLREDUCE_FROM else NATIVE
    return algo


def hierarchical_applies(info: DtypeInfo, nbytes: int, mode: str, nodes: NodeSplit | None) -> bool:
    """Whether the hierarchical all_reduce should run (``mode``: ``MPICOMM_HIERARCHICAL``)."""
    if nodes is None or nodes.num_nodes < 2 or mode == "0":
        return False
    if info.dtype not in HIERARCHICAL_DTYPES:
        return False
    if mode == "1":
        return True
    return (
        info.dtype in AUTO_DTYPES
        and nodes.smallest_node >= AUTO_MIN_PER_NODE
        and nbytes >= HIERARCHICAL_FROM
    )


def all_reduce_algorithm(
    info: DtypeInfo, nbytes: int, algo: str, mode: str, nodes: NodeSplit | None
) -> str:
    """The algorithm of one all_reduce: ``hierarchical``, ``native`` or ``bytes``."""
    if hierarchical_applies(info, nbytes, mode, nodes):
        return HIERARCHICAL
    return flat_algorithm(info, nbytes, algo)
