"""Splitting the world into vLLM's parallel groups.

Rank layout (as vLLM): global rank = ((dp * PP + pp) * TP + tp) inside each block of TP*PP*DP
ranks; when the world holds several such blocks, each is an independent replica. TP groups are
consecutive ranks, PP groups stride by TP, DP groups by TP*PP, and the EP group (when enabled) is
every rank of the replica with the same pipeline stage (DP x TP ranks).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from ._mpi import MPI
from .calls import created
from .communicator import MPICommunicator
from .topology import Topology, default_device, node_topology
from .validation import as_int, check_comm, check_flag

_TAG_UB = 32767  # the smallest MPI_TAG_UB the MPI standard allows


@dataclass
class ParallelGroups:
    """This rank's communicators: ``tp``, ``pp``, ``dp``, ``ep`` (``None`` unless expert parallel
    is enabled) and ``world``; plus ``topology`` and the sizes."""

    tp: MPICommunicator
    pp: MPICommunicator
    dp: MPICommunicator
    ep: MPICommunicator | None
    world: MPICommunicator
    topology: Topology
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    _cpu_groups: list[MPI.Comm] = field(default_factory=list, repr=False)

    def communicators(self) -> list[MPICommunicator]:
        """The groups in creation order (world, tp, pp, dp, ep)."""
        return [c for c in (self.world, self.tp, self.pp, self.dp, self.ep) if c is not None]

    def destroy(self) -> None:
        """Destroy every communicator and free the split communicators, in the same order on all
        ranks. Collective; idempotent."""
        for comm in self.communicators():
            comm.destroy()
        for cpu in self._cpu_groups:
            if cpu != MPI.COMM_NULL:
                cpu.Free()
        self._cpu_groups.clear()


def _positive(name: str, value: object) -> int:
    value = as_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _agreed_sizes(comm: MPI.Comm, sizes: dict[str, object]) -> tuple[int, ...]:
    """The checked sizes, the same on every rank of ``comm`` (one exchange, collective).

    A rank whose own sizes are invalid raises its ``TypeError``/``ValueError``; the other ranks
    raise ``ValueError`` naming it; ranks that passed different sizes all raise ``ValueError``.
    """
    try:
        mine: tuple[int, ...] | str = tuple(
            int(check_flag(v, k)) if k.startswith("enable") else _positive(k, v)
            for k, v in sizes.items()
        )
        error = None
    except (TypeError, ValueError) as exc:
        mine, error = f"{type(exc).__name__}: {exc}", exc
    every = comm.allgather(mine)
    if error is not None:
        raise error
    bad = [f"rank {r}: {e}" for r, e in enumerate(every) if isinstance(e, str)]
    if bad:
        raise ValueError(
            f"initialize_model_parallel: invalid sizes on other ranks ({'; '.join(bad)})"
        )
    if any(e != mine for e in every):
        names = ", ".join(sizes)
        table = "; ".join(f"rank {r}: {e}" for r, e in enumerate(every))
        raise ValueError(
            f"initialize_model_parallel: the ranks passed different sizes ({names}): {table}"
        )
    return mine


def initialize_model_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    data_parallel_size: int = 1,
    enable_expert_parallel: bool = False,
    *,
    comm: MPI.Comm | None = None,
    device: torch.device | str | None = None,
    **communicator_options,
) -> ParallelGroups:
    """Split ``comm`` (default ``COMM_WORLD``) into TP, PP, DP (and EP) groups. Collective.

    ``device`` defaults to this rank's GPU (local rank modulo the GPUs torch sees) or ``cpu``.
    Extra keywords (``timeout``, ``validate``, ...) go to every :class:`MPICommunicator`.
    Raises ``ValueError`` on every rank when TP*PP*DP does not divide the world size, or when the
    ranks passed different sizes (exchanged once, before any group is made).
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    check_comm(comm, "comm")
    sizes = {
        "tensor_parallel_size": tensor_parallel_size,
        "pipeline_parallel_size": pipeline_parallel_size,
        "data_parallel_size": data_parallel_size,
        "enable_expert_parallel": enable_expert_parallel,
    }
    tp_size, pp_size, dp_size, _ = _agreed_sizes(comm, sizes)
    world_size, rank = comm.Get_size(), comm.Get_rank()
    block = tp_size * pp_size * dp_size
    if world_size % block:
        raise ValueError(
            f"tensor_parallel_size * pipeline_parallel_size * data_parallel_size = "
            f"{tp_size}*{pp_size}*{dp_size} = {block} does not divide the world size {world_size}"
        )
    replica, inner = divmod(rank, block)
    tp, pp, dp = inner % tp_size, (inner // tp_size) % pp_size, inner // (tp_size * pp_size)

    topology = node_topology(comm)
    if device is None:
        device = default_device(topology.local_rank)

    def split(color: tuple[int, ...], key: int) -> MPI.Comm:
        code = 0
        for part, base in zip(color, (world_size, tp_size, pp_size, dp_size), strict=False):
            code = code * (base + 1) + part
        return created("initialize_model_parallel", lambda: comm.Split(code, key), "a group")

    cpu_groups = [created("initialize_model_parallel", comm.Dup, "the world group")]
    cpu_groups.append(split((replica, dp, pp), tp))
    cpu_groups.append(split((replica, dp, tp), pp))
    cpu_groups.append(split((replica, pp, tp), dp))
    if enable_expert_parallel:
        cpu_groups.append(split((replica, pp), dp * tp_size + tp))
    names = ["world:0", "tp:0", "pp:0", "dp:0", "ep:0"]
    comms = [
        MPICommunicator(cpu, device=device, unique_name=name, **communicator_options)
        for cpu, name in zip(cpu_groups, names, strict=False)
    ]
    return ParallelGroups(
        tp=comms[1],
        pp=comms[2],
        dp=comms[3],
        ep=comms[4] if enable_expert_parallel else None,
        world=comms[0],
        topology=topology,
        tensor_parallel_size=tp_size,
        pipeline_parallel_size=pp_size,
        data_parallel_size=dp_size,
        _cpu_groups=cpu_groups,
    )


def ranks_communicator(ranks: list[int], name: str = "") -> MPI.Comm:
    """A new MPI communicator of the ``COMM_WORLD`` ranks ``ranks``, in that order (the one home
    of making a group's communicator from a list of ranks, as torch.distributed and vLLM name
    their groups).

    Collective over the members only (``MPI_Comm_create_group``, its tag derived from ``name``);
    the caller frees it. Ranks that are not distinct world ranks, or a calling rank not among
    them, raise ``ValueError`` before any MPI call.
    """
    world = MPI.COMM_WORLD
    ranks = [as_int(r, "ranks") for r in ranks]
    if len(set(ranks)) != len(ranks) or not all(0 <= r < world.Get_size() for r in ranks):
        raise ValueError(f"ranks {ranks} of group {name!r} are not distinct MPI world ranks")
    if world.Get_rank() not in ranks:
        raise ValueError(f"MPI rank {world.Get_rank()} is not a member of group {name!r} {ranks}")
    everyone = world.Get_group()
    try:
        members = everyone.Incl(ranks)
    finally:
        everyone.Free()
    try:
        tag = zlib.crc32(name.encode()) % (_TAG_UB + 1)
        return created(name, lambda: world.Create_group(members, tag), "the group's communicator")
    finally:
        members.Free()
