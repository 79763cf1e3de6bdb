"""Splitting the world into vLLM's parallel groups.

Rank layout (as vLLM): global rank = ((dp * PP + pp) * TP + tp) inside each block of TP*PP*DP
ranks; when the world holds several such blocks, each is an independent replica. TP groups are
consecutive ranks, PP groups stride by TP, DP groups by TP*PP, and the EP group (when enabled) is
every rank of the replica with the same pipeline stage (DP x TP ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from .communicator import MPICommunicator
from .topology import Topology, default_device, node_topology


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
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


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
    Raises ``ValueError`` on every rank when TP*PP*DP does not divide the world size.
    """
    tp_size = _positive("tensor_parallel_size", tensor_parallel_size)
    pp_size = _positive("pipeline_parallel_size", pipeline_parallel_size)
    dp_size = _positive("data_parallel_size", data_parallel_size)
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py MPI.Comm, got {type(comm).__name__}")
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
        return comm.Split(code, key)

    cpu_groups = [comm.Dup()]
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
