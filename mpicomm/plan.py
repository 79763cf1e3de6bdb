"""Which engine a group holds (once, at construction), and how one sum runs: the one place that
chooses a group's engine (:func:`engine_for`) and an all_reduce's (and reduce_scatter's) algorithm.

``native``
    MPI's own ``Allreduce`` / ``Reduce_scatter``, where MPI sums the dtype exactly as promised
    (integers, bool as logical or, float32/float64, complex) and is the faster choice.
``bytes``
    :func:`mpicomm.reduction.all_reduce_bytes`: raw bytes through MPI, the sum by torch in rank
    order in the accumulation dtype (the only algorithm for 16-bit and 8-bit floats).
``hierarchical``
    :func:`mpicomm.hierarchical.all_reduce`: for groups that span nodes (float types only).
``shm``
    :mod:`mpicomm.shm`: host tensors of a group whose ranks all share a node, summed by the
    compiled core in shared memory (chosen first where the communicator has a segment; the
    non-sum collectives of such a group go through it too). See :func:`shm_wanted`.

Every rank decides alike from the dtype, the size, the communicator's settings and its node split,
so no agreement message is needed.

The engines (:mod:`mpicomm.engines`): ``shm`` (a group on one node with a shared-memory segment),
``hierarchical`` (a group that spans nodes: MPI, with the hierarchical sum) and ``mpi`` (MPI
alone: every other group).
"""

from __future__ import annotations

import logging

import torch

from .dtypes import DtypeInfo
from .topology import NodeSplit

NATIVE, BYTES, HIERARCHICAL, SHM = "native", "bytes", "hierarchical", "shm"
MPI_ONLY = "mpi"  # the engine of a group that has neither a segment nor a node split

log = logging.getLogger(__name__)
_told_not_built: list[bool] = []  # [True] once the missing compiled core has been logged

# Message size (bytes) from which the bytes algorithm replaces MPI's Allreduce for dtypes MPI can
# sum. Measured with `python -m mpicomm bench --crossover` (2 ranks, MPICH wheel): bytes won only
# from 64 MiB (benchmarks/results/history/2026-11-24-mpi-core.md, "all_reduce algorithm crossover").
BYTES_ALLREDUCE_FROM = 64 << 20

# Dtypes whose elementwise add torch does not implement on every device: MPI only.
_TORCH_CANNOT_ADD = {torch.uint16, torch.uint32, torch.uint64}

# The hierarchical all_reduce handles these. ``auto`` uses it for messages of at least
# HIERARCHICAL_FROM bytes when the group spans nodes and either its two-dimensional sum runs (every
# node holds as many ranks, at least 2, with a node segment, on host memory), for 16-bit floats
# only below NARROW_TWO_LEVEL_BELOW bytes, or, for the leader algorithm, 16-bit floats where every
# node holds AUTO_MIN_PER_NODE ranks. Measured at 2 hosts x 2 ranks (docs/multinode.md): the
# two-dimensional sum beat MPI's Allreduce for float32 from 64 KiB to 4 MiB and the bytes
# algorithm for bfloat16 at 64 KiB and 1 MiB, but not at 4 MiB, with no more bytes on the
# network; at 2 hosts x 4 ranks the bytes algorithm, not node-aware, moved more bytes than the
# leader algorithm.
HIERARCHICAL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
AUTO_DTYPES = frozenset({torch.float16, torch.bfloat16})
AUTO_MIN_PER_NODE = 4
HIERARCHICAL_FROM = 64 << 10
NARROW_TWO_LEVEL_BELOW = 4 << 20
# The two-dimensional sum of 16-bit floats over two nodes: below this many bytes (the 16-bit
# tensor) the nodes exchange their float32 chunks whole, one network round trip; from it, half a
# chunk goes out in float32 and the finished half comes back rounded, a quarter fewer bytes for a
# second round trip (docs/multinode.md, "One exchange for small 16-bit sums").
NARROW_ONE_EXCHANGE_BELOW = 128 << 10


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


def two_level(nodes: NodeSplit, node_memory: bool) -> bool:
    """Whether the hierarchical all_reduce runs as the two-dimensional sum
    (:mod:`mpicomm.hierarchical`): every node holds as many ranks, at least 2, and the node-local
    steps run in shared memory (``node_memory``: this node's segment exists and the data is in
    host memory)."""
    return node_memory and nodes.uniform and nodes.smallest_node >= 2


def one_exchange(dtype: torch.dtype, accumulate: torch.dtype, nbytes: int) -> bool:
    """Whether the two-node step of the two-dimensional sum of ``nbytes`` of ``dtype`` (summed
    in ``accumulate``) is one exchange of whole chunks rather than two of halves."""
    return dtype is accumulate or nbytes < NARROW_ONE_EXCHANGE_BELOW


def hierarchical_applies(
    info: DtypeInfo, nbytes: int, mode: str, nodes: NodeSplit | None, node_memory: bool = False
) -> bool:
    """Whether the hierarchical all_reduce should run (``mode``: ``MPICOMM_HIERARCHICAL``;
    ``node_memory``: as in :func:`two_level`)."""
    if nodes is None or nodes.num_nodes < 2 or mode == "0":
        return False
    if info.dtype not in HIERARCHICAL_DTYPES:
        return False
    if mode == "1":
        return True
    if nbytes < HIERARCHICAL_FROM:
        return False
    narrow = info.dtype in AUTO_DTYPES
    if two_level(nodes, node_memory) and (not narrow or nbytes < NARROW_TWO_LEVEL_BELOW):
        return True
    return narrow and nodes.smallest_node >= AUTO_MIN_PER_NODE


def all_reduce_algorithm(
    info: DtypeInfo,
    nbytes: int,
    algo: str,
    mode: str,
    nodes: NodeSplit | None,
    node_memory: bool = False,
) -> str:
    """The algorithm of one all_reduce: ``hierarchical``, ``native`` or ``bytes``."""
    if hierarchical_applies(info, nbytes, mode, nodes, node_memory):
        return HIERARCHICAL
    return flat_algorithm(info, nbytes, algo)


def engine_for(
    shm: str, built: bool, node_of: tuple[int, ...], hierarchical: str, staging: bool
) -> str:
    """The engine of a group (:mod:`mpicomm.engines`; decided once, at construction, alike on
    every rank): ``shm`` where :func:`shm_wanted`, else ``hierarchical`` where the group spans
    nodes and ``hierarchical`` (``MPICOMM_HIERARCHICAL``) is not ``0``, else ``mpi``.

    ``shm``: ``MPICOMM_SHM`` or the ``shm=`` keyword; ``built``: the compiled core is importable;
    ``node_of``: each rank's node index, 0 for the first rank's node (``(0,)`` for one rank);
    ``staging``: ``MPICOMM_STAGING``. Raises ``ValueError`` as :func:`shm_wanted` does.
    """
    one_node = max(node_of) == 0
    if shm_wanted(shm, built, len(node_of), one_node, staging):
        return SHM
    if not one_node and hierarchical != "0":
        return HIERARCHICAL
    return MPI_ONLY


def shm_wanted(mode: str, built: bool, world: int, one_node: bool, staging: bool) -> bool:
    """Whether a communicator maps a shared-memory segment (decided once, at construction, alike
    on every rank). ``mode``: ``MPICOMM_SHM`` or the ``shm=`` keyword (``auto``, ``0``, ``1``).

    ``auto``: when the compiled core is built, the group has at least 2 ranks, all on one node,
    and staging is not forced (``MPICOMM_STAGING=1`` tests the staging path). ``1`` also serves a
    1-rank group and raises ``ValueError`` where a segment is impossible.
    """
    if mode == "0":
        return False
    why = no_segment_reason(mode, built, one_node, staging)
    if mode == "1":
        if why is not None:
            raise ValueError(f"MPICOMM_SHM=1 (shm=1) asks for shared memory, but {why}")
        return True
    wanted = world >= 2 and one_node and not staging
    if wanted and not built:
        warn_not_built()
    return wanted and why is None


def no_segment_reason(mode: str, built: bool, one_node: bool, staging: bool) -> str | None:
    """Why a group gets no shared-memory segment whatever its size (the words of
    :func:`shm_wanted`'s refusal and of ``python -m mpicomm info``), ``None`` when nothing rules
    one out. Arguments as for :func:`shm_wanted`."""
    if mode == "0":
        return "MPICOMM_SHM=0"
    if not built:
        return (
            "the compiled core mpicomm.shm._core is not built (pip install -e . or "
            "python setup.py build_ext --inplace builds it)"
        )
    if not one_node:
        return "the group spans nodes"
    if staging:
        return "MPICOMM_STAGING=1 forces staging"
    return None


def warn_not_built() -> None:
    """Log once per process (WARNING) that a group that could use shared memory falls back to
    MPI because the compiled core is not built (a source checkout without ``build_ext``)."""
    if _told_not_built:
        return
    _told_not_built.append(True)
    log.warning(
        "mpicomm: the compiled shared-memory core (mpicomm.shm._core) is not built, so groups "
        "on one node use MPI only, which is slower for small messages; build it with "
        "`python setup.py build_ext --inplace` in a source checkout, or install mpicomm with pip "
        "(MPICOMM_SHM=0 chooses MPI only and silences this)"
    )


def node_shm_wanted(mode: str, built: bool, local_size: int, staging: bool) -> bool:
    """Whether a group that spans nodes maps a segment for the ranks of each node, for the
    node-local steps of the hierarchical all_reduce (:mod:`mpicomm.hierarchical`): unless
    ``MPICOMM_SHM=0``, where the core is built, this node holds 2+ of the group's ranks and
    staging is not forced."""
    wanted = mode != "0" and local_size >= 2 and not staging
    if wanted and not built:
        warn_not_built()
    return built and wanted
