"""The shared-memory engine: a group whose ranks all share a node, with a segment (docs/shm.md).

Host tensors go through the group's :class:`~mpicomm.shm.Transport` (the compiled core); CUDA
tensors, and calls the transport declines (it returns ``None``: a dtype its sums do not cover),
take the MPI engine's path. The transport's hot paths are this engine's (:attr:`sum_fresh` ...).
"""

from __future__ import annotations

import math

import torch

from .. import plan
from ..errors import CommunicationError
from ..shm import Transport
from ..staging import overlaps_partly, readable, stacked_shape, writable_into
from .mpi import MPIEngine, Parts, into, writes_into


class ShmEngine(MPIEngine):
    """:class:`~mpicomm.engines.mpi.MPIEngine` whose host-tensor paths run in ``transport``."""

    kind = plan.SHM

    def __init__(self, parts: Parts, algo: str, mode: str, transport: Transport) -> None:
        super().__init__(parts, algo, mode)
        self.transport = transport
        self.sum_fresh = transport.sum_fresh
        self.sum_into = transport.sum_into
        self.gather_fresh = transport.gather_fresh
        self.gatherv_fresh = transport.gatherv_fresh
        self.scatter_fresh = transport.scatter_fresh

    def plain(self) -> MPIEngine:
        return MPIEngine(self.parts, self.algo, self.mode)

    def close(self) -> None:
        self.transport.close()

    def timeout_changed(self) -> None:
        self.transport.timeout = self.call.timeout

    def algorithm(self, input_: torch.Tensor, info) -> str:
        if input_.is_cpu and self.transport.sums(input_.dtype):
            return plan.SHM
        return super().algorithm(input_, info)

    def all_reduce(self, input_, out, info) -> torch.Tensor:
        if input_.is_cpu:
            target = None if out is not None and overlaps_partly(out, input_) else out
            result = self.transport.all_reduce(input_, target)
            if result is not None:
                return into(out, result)
        return super().all_reduce(input_, out, info)

    def _scatter(self, operation, moved, x, counts, shape, target, info, route) -> torch.Tensor:
        if moved.is_cpu:
            result = self.transport.reduce_scatter(x, counts, shape, operation, out=target)
            if result is not None:
                return result
        return super()._scatter(operation, moved, x, counts, shape, target, info, route)

    def all_gather(self, x, dim, out) -> torch.Tensor:
        if not x.is_cpu:
            return super().all_gather(x, dim, out)
        route = self.route(x.device)
        shape = stacked_shape(x.shape, self.world, dim)
        x = readable(x).contiguous()
        if dim == 0 and writes_into(out, x, route):
            return self.transport.all_gather(x, shape, out=out)
        return into(out, route.gathered(self.transport.all_gather(x, shape), dim))

    def gather(self, x, dim, dst, out) -> torch.Tensor | None:
        if not x.is_cpu:
            return super().gather(x, dim, dst, out)
        route = self.route(x.device)
        root = self.rank == dst
        shape = stacked_shape(x.shape, self.world, dim)
        x = readable(x).contiguous()
        target = out if root and dim == 0 and writes_into(out, x, route) else None
        counts = [x.numel()] * self.world
        buf = self.transport.gatherv(x, counts, x.itemsize, shape, dst, out=target)
        if not root or buf is target:
            return buf
        return into(out, route.gathered(buf, dim))

    def all_gatherv(self, tensor, sizes, out) -> torch.Tensor:
        if not tensor.is_cpu:
            return super().all_gatherv(tensor, sizes, out)
        shape = (sum(sizes), *tensor.shape[1:])
        x = readable(tensor).contiguous()
        row = math.prod(x.shape[1:]) * x.itemsize
        target = out if writes_into(out, x, self.route(tensor.device)) else None
        return into(out, self.transport.gatherv(x, sizes, row, shape, -1, out=target))

    def broadcast(self, tensor, src, out) -> torch.Tensor:
        if not tensor.is_cpu:
            return super().broadcast(tensor, src, out)
        if out is not None and plain_host(out) and writable_into(out, tensor):
            return self.transport.broadcast(tensor, src, out)
        return into(out, self.transport.broadcast(tensor, src))

    def barrier(self) -> None:
        call = self.call
        if call.broken is not None:
            raise CommunicationError(
                f"barrier on group {call.group!r}: the communicator is unusable "
                f"after an earlier failure ({call.broken})",
                operation="barrier",
                group=call.group,
            )
        self.transport.barrier()


def plain_host(tensor: torch.Tensor) -> bool:
    """A dense host tensor (what the shared-memory calls take without further checks)."""
    return tensor.is_cpu and tensor.layout is torch.strided and not tensor.is_nested
