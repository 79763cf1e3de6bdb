"""DeviceCommunicatorBase: vLLM's device-communicator interface, with working defaults.

A subclass implements the primitives (``all_reduce``, ``all_gather``, ``send``, ``recv``,
``broadcast``); the base derives the rest from them, so a minimal communicator is complete. MoE
``dispatch``/``combine`` default to returning their inputs and ``prepare_communication_buffer_for_model``
to doing nothing, as in vLLM.
"""

from __future__ import annotations

import torch

from ._mpi import MPI
from .validation import check_comm, check_rank, check_sizes, even_sizes, normalize_dim


def _global_ranks(comm: MPI.Comm) -> list[int]:
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return list(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world))
    finally:
        group.Free()
        world.Free()


class DeviceCommunicatorBase:
    """One group's tensor collectives on one device.

    Attributes: ``cpu_group`` and ``device_group`` (``mpi4py.MPI.Comm``), ``device``,
    ``unique_name``, ``rank`` / ``rank_in_group`` (this rank in the group), ``world_size``,
    ``ranks`` (global ranks of the members in group order), ``global_rank``, ``global_world_size``.
    """

    def __init__(
        self,
        cpu_group: MPI.Comm | None = None,
        device: torch.device | str | None = None,
        device_group: MPI.Comm | None = None,
        unique_name: str = "",
    ) -> None:
        if cpu_group is None:
            cpu_group = MPI.COMM_WORLD
        check_comm(cpu_group, "cpu_group")
        if device_group is not None:
            check_comm(device_group, "device_group")
        if not isinstance(unique_name, str):
            raise TypeError(f"unique_name must be a str, got {type(unique_name).__name__}")
        try:
            self.device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device={device!r} is not a torch device: {exc}") from None
        self.cpu_group = cpu_group
        self.device_group = device_group
        self.unique_name = unique_name
        self.rank = self.rank_in_group = cpu_group.Get_rank()
        self.world_size = cpu_group.Get_size()
        self.ranks = _global_ranks(cpu_group)
        self.global_rank = MPI.COMM_WORLD.Get_rank()
        self.global_world_size = MPI.COMM_WORLD.Get_size()

    # Primitives a subclass provides.
    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        raise NotImplementedError

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        raise NotImplementedError

    def recv(self, size: torch.Size, dtype: torch.dtype, src: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        raise NotImplementedError

    # Derived collectives: correct for any subclass, overridden where a direct route is faster.
    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum over the group, then this rank's equal chunk along ``dim``."""
        dim = normalize_dim(dim, input_.dim())
        total = input_.shape[dim] if input_.dim() else 1
        even_sizes(total, self.world_size, dim)
        return self.reduce_scatterv(input_, dim, None)

    def reduce_scatterv(
        self, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None
    ) -> torch.Tensor:
        """Sum over the group, then rows ``[sum(sizes[:r]), +sizes[r])`` along ``dim``."""
        dim = normalize_dim(dim, input_.dim())
        total = input_.shape[dim] if input_.dim() else 1
        if sizes is None:
            sizes = even_sizes(total, self.world_size, dim)
        sizes = check_sizes(sizes, self.world_size, total=total, whole=f"input_.shape[{dim}]")
        start = sum(sizes[: self.rank])
        summed = self.all_reduce(input_)
        return summed.narrow(dim, start, sizes[self.rank]).contiguous()

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """``all_gather(input_, dim)`` on rank ``dst``; ``None`` elsewhere."""
        check_rank(dst, self.world_size, "dst")
        out = self.all_gather(input_, dim)
        return out if self.rank == dst else None

    def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
        """All-gather with ``sizes[i]`` rows from rank i (dim 0 only); equal sizes here."""
        if sizes is not None and len(set(sizes)) > 1:
            raise NotImplementedError("this communicator gathers equal sizes only")
        if isinstance(input_, list | tuple):
            return [self.all_gather(t, 0) for t in input_]
        return self.all_gather(input_, 0)

    def dispatch(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
    ):
        """MoE dispatch; the default keeps every token where it is."""
        if extra_tensors is not None:
            return hidden_states, router_logits, extra_tensors
        return hidden_states, router_logits

    def combine(self, hidden_states: torch.Tensor, is_sequence_parallel: bool = False):
        """MoE combine; the default returns its input."""
        return hidden_states

    def prepare_communication_buffer_for_model(self, model: torch.nn.Module) -> None:
        """One-time preparation after a model is loaded; the default does nothing."""

    def destroy(self) -> None:
        """Release what the communicator holds; the default holds nothing."""
