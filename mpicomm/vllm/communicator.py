"""``VllmMPICommunicator``: the installed vLLM's ``DeviceCommunicatorBase``, served by MPI.

vLLM's ``GroupCoordinator`` builds one device communicator per process group it belongs to,
passing the group's torch ``cpu_group``/``device_group``. This class keeps vLLM's bookkeeping
(the base constructor sets ``rank``, ``ranks``, ``world_size``, ``rank_in_group``, ``use_all2all``
...) and sends every tensor collective through an :class:`mpicomm.MPICommunicator` built on an
MPI sub-communicator of ``MPI.COMM_WORLD`` that holds the group's global ranks in group order.

The MPI sub-communicator is made with ``MPI_Comm_create_group``, which is collective over the
group's members only: vLLM constructs a communicator on the members of one group, never on the
whole world (groups of size 1 have no communicator at all), so a world-collective ``Split`` could
deadlock or pair the wrong calls; ``Create_group`` cannot.

Signatures follow the installed vLLM, found by inspecting its base class: vLLM 0.15 (``dispatch(
hidden_states, router_logits, ...)``, ``prepare_communication_buffer_for_model``) and newer
releases (constructor keywords such as ``use_all2all``, ``dispatch(hidden_states, topk_weights,
topk_ids, ...)``, ``dispatch_router_logits``, ``combine_into_output``,
``reduce_scatterv_into_output``). Unknown constructor keywords are accepted and ignored.

MoE dispatch/combine: on the expert-parallel group with data parallelism (``use_all2all``), vLLM's
own all-gather/reduce-scatter manager (``AgRsAll2AllManager``) is used, whatever all2all backend
is configured (the others need CUDA kernels). It gathers over vLLM's DP (or EP) group, so its
traffic reaches that group's ``VllmMPICommunicator.all_gatherv``/``reduce_scatterv``. Without a
manager, ``dispatch``/``combine`` are mpicomm's own (all-gather across this group, then the
matching reduce-scatter).

``calls`` counts the collectives this communicator served: a dict from each method name in
``SERVED`` to its count (a plain dict: a model layer's all_reduce pays for the count on every
call, and a ``Counter``'s increment costs twice a dict's).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from vllm.distributed.device_communicators.base_device_communicator import (
    DeviceCommunicatorBase as _VllmBase,
)

from ..consistency import COLLECTIVES
from ..groups import ranks_communicator

logger = logging.getLogger(__name__)

_BASE_INIT = inspect.signature(_VllmBase.__init__).parameters
_BASE_INIT_KW = frozenset(_BASE_INIT) - {
    "self",
    "cpu_group",
    "device",
    "device_group",
    "unique_name",
}
TOPK_DISPATCH = "topk_ids" in inspect.signature(_VllmBase.dispatch).parameters
# What ``calls`` counts: the tensor collectives, point to point, MoE.
SERVED = (
    *COLLECTIVES,
    "send",
    "recv",
    "send_tensor_dict",
    "recv_tensor_dict",
    "dispatch",
    "dispatch_router_logits",
    "combine",
)
"""True when the installed vLLM dispatches ``(hidden_states, topk_weights, topk_ids)``."""


def _make_all2all_manager(cpu_group):
    from vllm.distributed.device_communicators.all2all import AgRsAll2AllManager

    return AgRsAll2AllManager(cpu_group)


class VllmMPICommunicator(_VllmBase):
    """vLLM device communicator that runs every collective on MPI through mpicomm.

    Constructed by vLLM's ``GroupCoordinator`` with the group's torch process groups; results
    follow mpicomm's CONTRACT (fresh contiguous tensors, exact integer sums, fp16/bf16 summed in
    fp32 and rounded once, identical bits on every rank).
    """

    supports_tensor_dict = True
    """vLLM's CPU platform then sends pipeline activations (``GroupCoordinator.send_tensor_dict``
    / ``recv_tensor_dict``) through :meth:`send_tensor_dict`, not through the torch group."""

    def __init__(
        self,
        cpu_group,
        device: torch.device | None = None,
        device_group=None,
        unique_name: str = "",
        **kwargs: Any,
    ):
        accepted = {k: v for k, v in kwargs.items() if k in _BASE_INIT_KW}
        ignored = sorted(set(kwargs) - set(accepted))
        if ignored:
            logger.debug("mpicomm: %s ignores constructor keywords %s", unique_name, ignored)
        super().__init__(cpu_group, device, device_group, unique_name, **accepted)
        # vLLM 0.15 has no use_all2all keyword; it derives the flag from the config itself.
        self.use_all2all = bool(getattr(self, "use_all2all", False))
        self.calls: dict[str, int] = dict.fromkeys(SERVED, 0)

        from mpi4py import MPI

        import mpicomm

        world_rank = MPI.COMM_WORLD.Get_rank()
        if world_rank != self.global_rank:
            raise RuntimeError(
                f"mpicomm: torch rank {self.global_rank} != MPI rank {world_rank} in group "
                f"{unique_name!r}; launch one process per rank with RANK/WORLD_SIZE from MPI "
                "(python -m mpicomm.vllm.launch, or mpicomm.vllm.export_torch_env()) and "
                "distributed_executor_backend='external_launcher': vLLM's mp and ray executors "
                "start workers outside MPI and are not supported with mpicomm"
            )
        self.mpi_comm = ranks_communicator(list(self.ranks), unique_name)
        if self.mpi_comm.Get_rank() != self.rank_in_group:
            raise RuntimeError(
                f"mpicomm: MPI rank {self.mpi_comm.Get_rank()} != vLLM rank "
                f"{self.rank_in_group} in group {unique_name!r}"
            )
        self.mpi = mpicomm.MPICommunicator(
            cpu_group=self.mpi_comm, device=self.device, unique_name=unique_name
        )
        from .. import ops

        self.op_name = ops.register_communicator(self.mpi, unique_name or None, replace=True)

        if self.use_all2all:
            backend = getattr(self, "all2all_backend", None)
            if backend not in (None, "naive", "allgather_reducescatter"):
                logger.warning(
                    "mpicomm: all2all backend %r needs CUDA kernels; using allgather_reducescatter",
                    backend,
                )
            self.all2all_manager = _make_all2all_manager(self.cpu_group)

    # -- collectives ------------------------------------------------------------------------
    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        """Sum over the group; a fresh tensor of the input's shape and dtype on every rank."""
        self.calls["all_reduce"] += 1
        return self.mpi.all_reduce(input_)

    def all_gather(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``torch.cat`` of every rank's tensor along ``dim``, on every rank."""
        self.calls["all_gather"] += 1
        return self.mpi.all_gather(input_, dim)

    def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
        """Variable-row all-gather along dim 0 of a tensor or a list of tensors."""
        self.calls["all_gatherv"] += 1
        return self.mpi.all_gatherv(input_, dim, sizes)

    def reduce_scatter(self, input_: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum, then this rank's equal chunk along ``dim``."""
        self.calls["reduce_scatter"] += 1
        return self.mpi.reduce_scatter(input_, dim)

    def reduce_scatterv(
        self, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None
    ) -> torch.Tensor:
        """Sum, then this rank's ``sizes[rank]`` rows along ``dim``."""
        self.calls["reduce_scatterv"] += 1
        return self.mpi.reduce_scatterv(input_, dim, sizes)

    def reduce_scatterv_into_output(
        self,
        input_: torch.Tensor,
        output: torch.Tensor,
        dim: int = -1,
        sizes: list[int] | None = None,
    ) -> torch.Tensor:
        """:meth:`reduce_scatterv` written into ``output`` (returned)."""
        output.copy_(self.reduce_scatterv(input_, dim, sizes))
        return output

    def gather(self, input_: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """All-gather result on group rank ``dst``; ``None`` elsewhere."""
        self.calls["gather"] += 1
        return self.mpi.gather(input_, dst, dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank ``src``'s tensor on every rank (a fresh tensor)."""
        self.calls["broadcast"] += 1
        return self.mpi.broadcast(tensor, src)

    def send(self, tensor: torch.Tensor, dst: int | None = None) -> None:
        """Blocking send to group rank ``dst`` (default: next rank)."""
        self.calls["send"] += 1
        self.mpi.send(tensor, dst)

    def recv(self, size: torch.Size, dtype: torch.dtype, src: int | None = None) -> torch.Tensor:
        """Blocking receive of a ``size``/``dtype`` tensor from group rank ``src`` (default: previous)."""
        self.calls["recv"] += 1
        return self.mpi.recv(size, dtype, src)

    def send_tensor_dict(self, tensor_dict: dict[str, Any], dst: int) -> None:
        """Send a dict of tensors and picklable values to group rank ``dst`` (vLLM CPU path)."""
        self.calls["send_tensor_dict"] += 1
        meta, tensors = {}, []
        for key, value in tensor_dict.items():
            if isinstance(value, torch.Tensor):
                meta[key] = ("tensor", tuple(value.shape), value.dtype)
                tensors.append(value)
            else:
                meta[key] = ("value", value)
        self.mpi_comm.send(meta, dest=dst, tag=7)
        for t in tensors:
            self.mpi.send(t, dst)

    def recv_tensor_dict(self, src: int) -> dict[str, Any]:
        """Receive what :meth:`send_tensor_dict` sent from group rank ``src``."""
        self.calls["recv_tensor_dict"] += 1
        meta = self.mpi_comm.recv(source=src, tag=7)
        out: dict[str, Any] = {}
        for key, item in meta.items():
            if item[0] == "tensor":
                out[key] = self.mpi.recv(torch.Size(item[1]), item[2], src)
            else:
                out[key] = item[1]
        return out

    # -- MoE -------------------------------------------------------------------------------
    def _dispatch(self, method: str, tensors: list, is_sequence_parallel: bool, extra_tensors):
        self.calls[method] += 1
        manager = self.all2all_manager
        if manager is not None:
            name = method if hasattr(manager, method) else "dispatch"
            return getattr(manager, name)(*tensors, is_sequence_parallel, extra_tensors)
        first, second, *rest = tensors
        extras = list(rest) + list(extra_tensors or [])
        out = self.mpi.dispatch(
            first,
            second,
            is_sequence_parallel,
            extras if (extras or extra_tensors is not None) else None,
        )
        if not rest:
            return out
        h, s, gathered = out
        k = len(rest)
        result = (h, s, *gathered[:k])
        return (*result, gathered[k:]) if extra_tensors is not None else result

    def dispatch_router_logits(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
    ):
        """Gather ``(hidden_states, router_logits[, extras])`` rows from the token-owning ranks."""
        return self._dispatch(
            "dispatch_router_logits",
            [hidden_states, router_logits],
            is_sequence_parallel,
            extra_tensors,
        )

    def _dispatch_topk(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
    ):
        """Gather ``(hidden_states, topk_weights, topk_ids[, extras])`` (newer vLLM)."""
        return self._dispatch(
            "dispatch", [hidden_states, topk_weights, topk_ids], is_sequence_parallel, extra_tensors
        )

    def _dispatch_logits(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        is_sequence_parallel: bool = False,
        extra_tensors: list[torch.Tensor] | None = None,
    ):
        """Gather ``(hidden_states, router_logits[, extras])`` (vLLM 0.15)."""
        return self._dispatch(
            "dispatch", [hidden_states, router_logits], is_sequence_parallel, extra_tensors
        )

    dispatch = _dispatch_topk if TOPK_DISPATCH else _dispatch_logits

    def combine(self, hidden_states: torch.Tensor, is_sequence_parallel: bool = False):
        """Sum expert outputs back onto the ranks that own the tokens (rows of the last dispatch)."""
        self.calls["combine"] += 1
        if self.all2all_manager is not None:
            return self.all2all_manager.combine(hidden_states, is_sequence_parallel)
        return self.mpi.combine(hidden_states, is_sequence_parallel)

    def combine_into_output(
        self, hidden_states: torch.Tensor, output: torch.Tensor, is_sequence_parallel: bool = False
    ) -> torch.Tensor:
        """:meth:`combine` written into ``output`` (returned)."""
        manager = self.all2all_manager
        if manager is not None and hasattr(manager, "combine_into_output"):
            self.calls["combine"] += 1
            return manager.combine_into_output(hidden_states, output, is_sequence_parallel)
        output.copy_(self.combine(hidden_states, is_sequence_parallel))
        return output

    def prepare_communication_buffer_for_model(self, model: torch.nn.Module) -> None:
        """mpicomm's buffers for the model, then vLLM's own preparation (MoE kernels of the EP
        group) where the installed base class has one."""
        self.mpi.prepare_communication_buffer_for_model(model)
        parent = getattr(super(), "prepare_communication_buffer_for_model", None)
        if parent is not None:
            parent(model)

    def destroy(self) -> None:
        """Free the all2all manager, the mpicomm communicator and the MPI sub-communicator."""
        from .. import ops

        if self.all2all_manager is not None:
            self.all2all_manager.destroy()
            self.all2all_manager = None
        if getattr(self, "mpi", None) is not None:
            ops.unregister_communicator(self.op_name, self.mpi)
            self.mpi.destroy()
            self.mpi = None
        comm = getattr(self, "mpi_comm", None)
        if comm is not None:
            from mpi4py import MPI

            if comm != MPI.COMM_NULL:
                comm.Free()
            self.mpi_comm = None
